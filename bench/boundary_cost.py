"""What one dependent step costs at a kernel boundary (PDL, in a CUDA graph) against a grid-wide barrier inside
one persistent kernel: the floor under every launch of the decode step, measured on nothing but that.

    python3 bench/boundary_cost.py [steps] [reps]

A step: every block reads the whole 4096-float vector the step before wrote (8 loads a thread, each thread's
sum reduced per warp), and each warp writes 2 floats of the next vector (132 x 16 x 2 >= 4096), as a gemv's
x broadcast and y write. Footprints: "light" (512 threads, a few registers each) and "heavy" (96 floats a
thread loaded before the wait, from one small array every block shares, so no bytes to speak of, and added
after it: ~110 registers a thread, like fast2's preloading blocks): "heavy 512" takes the whole SM's register
file, so the next kernel's block cannot be resident until this one leaves; "heavy 256" takes half of it.
- chain: `steps` launches of the step kernel, 132 blocks of 512 threads, captured in one graph with PDL;
- persistent: one kernel of 132 blocks running the steps, a grid barrier between them (thread 0 of each block
  adds to a counter with release semantics and spins on an acquire load until all have arrived); the heavy
  variant loads the next step's 96 floats before it arrives at the barrier.
Prints us per step for each (best of `reps` graph replays)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
from bench_gemv import best_graph_us  # noqa: E402

from localmoe.backends.cuda import _numba  # noqa: E402
from localmoe.backends.cuda import kernels as K  # noqa: E402
from localmoe.backends.cuda._numba import cuda  # noqa: E402

VEC = 4096
HEAVY = 96


@K._intrinsic
def red_release_add(typingctx, addr, v):
    """red.release.gpu.global.add.u32 [addr], v."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], K._t.int64)
        x = context.cast(builder, args[1], sig.args[1], K._t.uint32)
        K._asm(builder, K._ir.VoidType(), [K._I64, K._I32], "red.release.gpu.global.add.u32 [$0], $1;",
               "l,r,~{memory}", [a, x], side_effect=True)
        return context.get_dummy_value()
    return K._t.none(addr, v), codegen


@K._intrinsic
def ld_acquire(typingctx, addr):
    """ld.acquire.gpu.global.u32 [addr]."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], K._t.int64)
        return K._asm(builder, K._I32, [K._I64], "ld.acquire.gpu.global.u32 $0, [$1];", "=r,l,~{memory}", [a],
                      side_effect=True)
    return K._t.uint32(addr), codegen


def step_src(heavy: bool, threads: int, indent: str, src: str, dst: str) -> list[str]:
    n = VEC // threads
    s = [f"{indent}a{j} = {src}[tid + {threads * j}]" for j in range(n)]
    s += [f"{indent}s = " + " + ".join(f"a{j}" for j in range(n))]
    if heavy:
        s += [f"{indent}s += " + " + ".join(f"w{j}" for j in range(HEAVY))]
    s += [f"{indent}for o in (16, 8, 4, 2, 1):",
          f"{indent}    s += cuda.shfl_xor_sync(0xffffffff, s, o)",
          f"{indent}if lane < 2:",
          f"{indent}    {dst}[(b * 16 + (tid >> 5)) * 2 + lane] = s * float32(0.000244140625) + float32(lane)"]
    return s


def preload(indent: str) -> list[str]:
    return [f"{indent}w{j} = W[{j}]" for j in range(HEAVY)]


def make_chain(heavy: bool, threads: int):
    src = ["def kern(W, x, y):", "    tid = cuda.threadIdx.x", "    b = cuda.blockIdx.x", "    lane = tid & 31"]
    if heavy:
        src += preload("    ")
    src += ["    grid_dependency()"] + step_src(heavy, threads, "    ", "x", "y")
    return K._jit_source(src, f"chain heavy={heavy}", max_registers=128 if heavy else None)


def make_persistent(heavy: bool, threads: int):
    src = ["def kern(W, x, y, counter, steps):", "    tid = cuda.threadIdx.x", "    b = cuda.blockIdx.x",
           "    lane = tid & 31", "    nb = cuda.gridDim.x", "    c = K.gaddr(counter, 0)"]
    if heavy:
        src += preload("    ")
    src += ["    grid_dependency()",
            "    for p in range(steps):",
            "        if p & 1 == 0:"] + step_src(heavy, threads, "            ", "x", "y") + [
            "        else:"] + step_src(heavy, threads, "            ", "y", "x")
    if heavy:
        src += preload("        ")
    src += ["        cuda.syncthreads()",
            "        if tid == 0:",
            "            cuda.threadfence()",
            "            red_release_add(c, 1)",
            "            target = uint32(nb * (p + 1))",
            "            while ld_acquire(c) < target:",
            "                pass",
            "        cuda.syncthreads()"]
    return K._jit_source(src, f"persistent heavy={heavy}", max_registers=128 if heavy else None, K=K,
                         red_release_add=red_release_add, ld_acquire=ld_acquire)


def main(steps: int, reps: int) -> None:
    _numba.PDL[0] = True
    stream = cp.cuda.Stream(non_blocking=True)
    K.STREAM[0] = cuda.external_stream(stream.ptr)
    nb = cuda.get_current_device().MULTIPROCESSOR_COUNT
    rng = np.random.default_rng()
    W = cp.asarray(rng.standard_normal(HEAVY, dtype=np.float32) * 1e-3)
    x = cp.asarray(rng.standard_normal(max(VEC, nb * 32), dtype=np.float32))
    y = cp.zeros_like(x)
    counter = cp.zeros(1, cp.uint32)
    st = K.STREAM[0]

    def chain(k, t):
        def run():
            for p in range(steps):
                (k[nb, t, st](W, x, y) if p % 2 == 0 else k[nb, t, st](W, y, x))
        return run

    def persistent(k, t):
        def run():
            counter.fill(0)
            k[nb, t, st](W, x, y, counter, steps)
        return run

    cases, kernels = {}, {}
    for heavy, t in ((False, 512), (True, 512), (True, 256)):
        kc, kp = make_chain(heavy, t), make_persistent(heavy, t)
        name = f"heavy {t}" if heavy else "light"
        cases[f"chain {name}"] = chain(kc, t)
        cases[f"persistent {name}"] = persistent(kp, t)
        kernels[f"chain {name}"], kernels[f"persistent {name}"] = kc, kp
    graphs = {}
    with stream:
        for name, run in cases.items():
            run()
            stream.synchronize()
            stream.begin_capture()
            run()
            graphs[name] = stream.end_capture()
        for name, g in graphs.items():
            regs = f", {max(kernels[name].get_regs_per_thread().values())} registers a thread"
            best = best_graph_us(g, stream, reps) / steps
            print(f"{name}: {best:.2f} us per step ({steps} steps, {nb} blocks{regs})", flush=True)
        # the same answer either way: the chain and the persistent kernel compute the same vectors
        for heavy in ("light", "heavy 512", "heavy 256"):
            outs = []
            for kind in ("chain", "persistent"):
                x[...] = cp.arange(x.size, dtype=cp.float32) * 1e-3
                graphs[f"{kind} {heavy}"].launch(stream)
                stream.synchronize()
                outs.append(cp.asnumpy(x if steps % 2 == 0 else y))
            print(f"{heavy}: chain and persistent agree: {np.array_equal(outs[0], outs[1])}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256, int(sys.argv[2]) if len(sys.argv) > 2 else 10)
