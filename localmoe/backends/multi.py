"""Several devices as one backend, expert parallel (issue #7; so far run on simulated devices only).

The lead device runs every kernel of the model (dense weights, KV cache, head), so the model code is
unchanged; each layer's routed experts are spread over the devices, expert e on device e % N
(placement.plan_experts). For the routed experts the lead's normed hidden state, the chosen ids and their
weights go to every device through the communicator; each device runs the chosen experts it owns (the
others get weight 0 on its first slot), and the partial sums come back to the lead, added in device order.

`LocalComm` is the communicator of simulated devices (host arrays; the tests). A GPU communicator (NCCL
broadcast / reduce on each device's stream) is the next step.
"""
from __future__ import annotations

import numpy as np

from . import Weight


class LocalComm:
    """Simulated devices in one process: a broadcast copies, a reduce adds the parts in device order."""

    @staticmethod
    def broadcast(a, n: int) -> list:
        return [a] + [np.array(a) for _ in range(n - 1)]

    @staticmethod
    def reduce_sum(parts: list):
        out = np.array(parts[0])
        for p in parts[1:]:
            out += p
        return out


def expert_shard(w: Weight, device: int, n_devices: int) -> Weight:
    """Device `device`'s experts of a routed-experts tensor: e = device, device + N, ... (a strided view,
    no copy), so global expert e is the device's slot e // N."""
    return Weight(w.raw[device::n_devices], w.type, w.cols, f"{w.name}[{device}::{n_devices}]")


def local_route(ids, weights, device: int, n_devices: int, xp=np):
    """(slots, weights) for one device: the ids it owns as its slots, every other choice weight 0 on slot 0."""
    mine = ids % n_devices == device
    return xp.where(mine, ids // n_devices, 0), xp.where(mine, weights, np.float32(0))


class ExpertParallel:
    """The kernel interface over `devices` (backends, the first one the lead) joined by `comm`."""

    def __init__(self, devices: list, comm):
        self.devices, self.comm = devices, comm
        self.lead = devices[0]
        self.name = f"{self.lead.name} x{len(devices)} (expert parallel)"
        self._shards: dict = {}

    def __getattr__(self, name):
        """Every kernel but the routed experts runs on the lead."""
        return getattr(self.lead, name)

    def _shard(self, w: Weight, d: int) -> Weight:
        k = (id(w.raw), w.raw.shape, d)
        if k not in self._shards:
            self._shards[k] = (w.raw, expert_shard(w, d, len(self.devices)))
        return self._shards[k][1]

    def expert_ffn(self, gate: Weight, up: Weight, down: Weight, x, ids, weights, plus=None):
        """The lead's routed experts, each computed on the device that owns it; their sum (+ plus) on the lead."""
        N = len(self.devices)
        xs, idss, ws = (self.comm.broadcast(a, N) for a in (x, ids, weights))
        parts = []
        for d, dev in enumerate(self.devices):
            slots, w = local_route(idss[d], ws[d], d, N, dev.xp)
            parts.append(dev.expert_ffn(self._shard(gate, d), self._shard(up, d), self._shard(down, d), xs[d], slots, w))
        y = self.comm.reduce_sum(parts)
        return y if plus is None else y + plus
