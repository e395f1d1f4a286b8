"""Where a model's weights go on the GPUs: the device of each layer, and per device whether its layers'
routed experts are resident or streamed through a VRAM cache of slots (backends/cuda/streaming.py).

A model is a list of layers, each placed on one device: contiguous blocks of layers in proportion to the
devices' free memory (`plan`: one device today; the multi-GPU layer split uses the same plan). Expert
parallel (`plan_experts`) instead keeps the dense layers on the first device and spreads each layer's
routed experts over all of them. Per device, the
dense weights (attention, norms, router, shared expert; the head and final norm on the last device) are
always resident; the routed experts are too when everything fits, otherwise they stream through a cache
of what is left (`--gpu-mem` sets that cache's size instead). The token embedding stays on the host (one
row per token is read from the mapped file). Pure arithmetic on byte counts, so it is tested on the CPU
with simulated devices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 2 ** 30
RESERVE = GiB // 2           # per device, beyond the weights and the KV cache: activations, scratch, the CUDA context


class PlacementError(ValueError):
    """The model does not fit the devices (with streaming, not even its dense weights and one layer's experts)."""


@dataclass(frozen=True)
class LayerBytes:
    """Weight bytes a device must hold: per layer dense and routed-expert bytes, and the rest (head, final norm)."""
    dense: tuple[int, ...]
    experts: tuple[int, ...]
    other: int


@dataclass(frozen=True)
class Placement:
    layer_device: tuple[int, ...]            # layer i lives on device layer_device[i] (-1: on every device)
    expert_cache: tuple[int | None, ...]     # per device: its expert cache's bytes; None = its experts resident
    need: tuple[int, ...]                    # per device: bytes this placement uses there
    expert_owner: tuple[int, ...] = ()       # expert parallel: expert e of every layer lives on device expert_owner[e]

    def streams(self, device: int = 0) -> bool:
        return self.expert_cache[device] is not None


def layer_bytes(tensors: dict, n_layers: int) -> LayerBytes:
    """From a GGUF's tensor table (name -> info with .nbytes): `blk.<i>.*` by layer, `*_exps` routed; the
    token embedding counts only where it is also the output head (tied: then it is uploaded)."""
    dense, experts, other = [0] * n_layers, [0] * n_layers, 0
    tied = "output.weight" not in tensors
    for name, ti in tensors.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            other += ti.nbytes if name != "token_embd.weight" or tied else 0
        elif name.split(".")[2].endswith("_exps"):
            experts[int(m.group(1))] += ti.nbytes
        else:
            dense[int(m.group(1))] += ti.nbytes
    return LayerBytes(tuple(dense), tuple(experts), other)


def split_layers(sizes: list[int], free: list[int]) -> list[int]:
    """Contiguous blocks of layers, one per device, each about its share (by free memory) of the bytes."""
    total, room = sum(sizes), sum(free)
    out, d, done = [], 0, 0
    for s in sizes:
        while d < len(free) - 1 and done + s / 2 > total * sum(free[:d + 1]) / room:
            d += 1
        out.append(d)
        done += s
    return out


def _device(dev: int, room: int, fixed: int, experts: int, min_cache: int, cache: int | None,
            reserve: int, stream: bool) -> tuple[int | None, int]:
    """(expert cache bytes or None when resident, bytes used) on one device: `fixed` must be resident,
    `experts` are resident when they fit (and no cache size was asked for), else stream through a cache."""
    if cache is None and fixed + experts <= room:
        return None, fixed + experts
    c = cache if cache is not None else min(experts, room - fixed)
    if not stream and cache is None:
        raise PlacementError(
            f"the model does not fit GPU {dev}: it needs {(fixed + experts) / GiB:.1f} GiB there (weights "
            f"{(fixed + experts - reserve) / GiB:.1f} GiB incl. KV cache, {reserve / GiB:.1f} GiB working room) and "
            f"{room / GiB:.1f} GiB is free; allow streaming the experts or add GPUs")
    if c < min_cache or fixed + c > room:
        want = fixed + max(min_cache, cache or 0)
        raise PlacementError(
            f"the model does not fit GPU {dev}: it needs {want / GiB:.1f} GiB there (dense weights "
            f"{(fixed - reserve) / GiB:.1f} GiB incl. KV cache, an expert cache of >= {max(min_cache, cache or 0) / GiB:.1f} GiB, "
            f"{reserve / GiB:.1f} GiB working room) and {room / GiB:.1f} GiB is free"
            + ("" if cache is None else "; lower --gpu-mem"))
    return c, fixed + c


def plan(lb: LayerBytes, free: list[int], kv_bytes: int, min_cache: int, cache: int | None = None,
         reserve: int = RESERVE, stream: bool = True) -> Placement:
    """Layer split. Devices with `free` bytes each; `kv_bytes`: the KV cache for the whole context, split
    like the layers; `min_cache`: the smallest expert cache that works (one layer's experts: a prefill
    batch may route to all of them); `cache`: the user's expert cache size (--gpu-mem), else only if
    needed (and allowed: `stream`)."""
    L = len(lb.dense)
    where = split_layers([d + e for d, e in zip(lb.dense, lb.experts)], free)
    caches, needs = [], []
    for dev, room in enumerate(free):
        mine = [i for i in range(L) if where[i] == dev]
        fixed = (sum(lb.dense[i] for i in mine) + kv_bytes * len(mine) // max(1, L) + reserve
                 + (lb.other if dev == len(free) - 1 else 0))
        c, need = _device(dev, room, fixed, sum(lb.experts[i] for i in mine), min_cache, cache, reserve, stream)
        caches.append(c)
        needs.append(need)
    return Placement(tuple(where), tuple(caches), tuple(needs))


def plan_experts(lb: LayerBytes, free: list[int], kv_bytes: int, min_cache: int, n_experts: int,
                 cache: int | None = None, reserve: int = RESERVE, stream: bool = True) -> Placement:
    """Expert parallel over len(free) devices (backends/multi.py): device 0, the lead, holds every dense
    weight, the head and the KV cache (it runs all but the routed experts: with one token in flight,
    copies of the dense work on other GPUs would not make it faster), and expert e of every layer lives
    on device e % N — round-robin, so neighbouring ids (often chosen together) land on different GPUs.
    Arguments as `plan`; `min_cache` and `cache` are per device."""
    n = len(free)
    owner = tuple(e % n for e in range(n_experts))
    caches, needs = [], []
    for dev, room in enumerate(free):
        share = owner.count(dev) / n_experts
        fixed = reserve + (sum(lb.dense) + kv_bytes + lb.other if dev == 0 else 0)
        experts = int(round(sum(lb.experts) * share))
        c, need = _device(dev, room, fixed, experts, int(round(min_cache * share)), cache, reserve, stream)
        caches.append(c)
        needs.append(need)
    return Placement((-1,) * len(lb.dense), tuple(caches), tuple(needs), owner)
