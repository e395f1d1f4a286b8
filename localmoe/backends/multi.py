"""Several devices as one backend, expert parallel (issue #7; so far with CPU worker processes only).

The lead device runs every kernel of the model (dense weights, KV cache, head), so the model code is
unchanged; each layer's routed experts are spread over the devices, expert e on device e % N
(placement.plan_experts). Every other device is a worker process with its own backend (`serve_experts`):
per MoE layer the lead sends it the layer, the normed hidden state, the chosen ids and their weights;
each device runs the chosen experts it owns (the others get weight 0 on its first slot), and the partial
sums come back to the lead, added in device order.

The messages go through a communicator: `PipeComm` (multiprocessing pipes, host arrays: CPU workers and
the tests). A GPU communicator (NCCL broadcast / reduce between one process per GPU) is the next step.
"""
from __future__ import annotations

import multiprocessing

import numpy as np

from . import DenseFFN, Weight, plain, swiglu


def expert_shard(w: Weight, device: int, n_devices: int) -> Weight:
    """Device `device`'s experts of a routed-experts tensor: e = device, device + N, ... (a strided view,
    no copy), so global expert e is the device's slot e // N."""
    return Weight(w.raw[device::n_devices], w.type, w.cols, f"{w.name}[{device}::{n_devices}]")


def local_route(ids, weights, device: int, n_devices: int, xp=np):
    """(slots, weights) for one device: the ids it owns as its slots, every other choice weight 0 on slot 0."""
    mine = ids % n_devices == device
    return xp.where(mine, ids // n_devices, 0), xp.where(mine, weights, np.float32(0))


def owned_ffn(be, gate: Weight, up: Weight, down: Weight, device: int, n_devices: int, x, ids, weights):
    """One device's part of a routed-experts layer: the chosen experts it owns, weighted, summed per token."""
    slots, w = local_route(ids, weights, device, n_devices, be.xp)
    return be.expert_ffn(*(expert_shard(t, device, n_devices) for t in (gate, up, down)), x, slots, w)


class PipeComm:
    """The lead's side of its workers' pipes: `broadcast` a message to every worker, `reduce_sum` the
    lead's part and the workers' replies in device order."""

    def __init__(self, conns: list):
        self.conns = conns

    def broadcast(self, msg) -> None:
        for c in self.conns:
            try:
                c.send(msg)
            except OSError:                         # the worker has stopped: its last message says why
                if c.poll(30):
                    self._reply(c)
                raise

    def reduce_sum(self, part):
        out = np.array(part)
        for c in self.conns:
            out += self._reply(c)
        return out

    @staticmethod
    def _reply(conn):
        """The worker's next message; the error it sent, raised, if it failed."""
        reply = conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"expert worker failed: {reply!r}")
        return reply


def serve_experts(path: str, device: int, n_devices: int, conn, backend: str = "cpu") -> None:
    """A worker process: open the model, then for every (layer, x, ids, weights) from the lead reply with this
    device's part, until None."""
    from ..model import load
    try:
        m = load(path, backend=backend)
        experts = {i: L.experts for i, L in enumerate(m.net.layers) if L.experts is not None}
        while (msg := conn.recv()) is not None:
            layer, x, ids, weights = msg
            ex = experts[layer]
            conn.send(m.backend.to_host(owned_ffn(m.backend, ex.gate, ex.up, ex.down, device, n_devices, x, ids,
                                                  weights)))
    except BaseException as e:                      # the lead raises it (one line) instead of waiting forever
        conn.send(e)


class ExpertParallel:
    """The kernel interface of `lead` with the routed experts spread over it and `n_devices - 1` workers
    (`start`); `close()` stops the workers."""

    def __init__(self, lead, comm, n_devices: int, procs=()):
        self.lead, self.comm, self.n_devices, self.procs = lead, comm, n_devices, list(procs)
        self.name = f"{lead.name} x{n_devices} (expert parallel)"

    @classmethod
    def start(cls, path, n_devices: int, lead, backend: str = "cpu") -> "ExpertParallel":
        ctx = multiprocessing.get_context("spawn")
        conns, procs = [], []
        for d in range(1, n_devices):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=serve_experts, args=(str(path), d, n_devices, theirs, backend), daemon=True)
            p.start()
            conns.append(mine)
            procs.append(p)
        return cls(lead, PipeComm(conns), n_devices, procs)

    def __getattr__(self, name):
        """Every kernel but the routed experts runs on the lead."""
        return getattr(self.lead, name)

    def expert_ffn(self, gate: Weight, up: Weight, down: Weight, x, ids, weights, shared: DenseFFN | None = None,
                   residual=None):
        """The routed experts of layer `gate.name`'s block, each computed on the device that owns it; their
        sum (+ the shared expert, run on the lead, + residual) on the lead."""
        layer = int(gate.name.split(".")[1])                         # blk.<layer>.ffn_..._exps
        to_host, x = self.lead.to_host, plain(self.lead, x)
        self.comm.broadcast((layer, to_host(x), to_host(ids), to_host(weights)))
        y = self.comm.reduce_sum(owned_ffn(self.lead, gate, up, down, 0, self.n_devices, x, ids, weights))
        if shared is not None:
            y = swiglu(self.lead, shared, x, residual=y)
        return y if residual is None else y + residual

    def close(self) -> None:
        for c in self.comm.conns:
            try:
                c.send(None)
            except OSError:                         # that worker has already stopped
                pass
        for p in self.procs:
            p.join(timeout=30)
