"""Registers per thread of the CUDA kernels, from `ptxas -v`, without a GPU: a block of T threads needs
T x registers <= 65536 to launch at all, and 65536 / (T x registers) blocks fit on one SM.

Needs numba-cuda with its NVVM (`pip install "numba-cuda[cu12]"`) and a CUDA toolkit's ptxas
(found on PATH, under $CUDA_HOME/bin, or /usr/local/cuda*/bin).
    python bench/kernel_registers.py
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from numba import types as t

from localmoe.backends.cuda import kernels as K
from localmoe.backends.cuda._numba import cuda

REGS_PER_SM = 65536
u32, i32, f1, f2 = t.uint32[::1], t.int32[::1], t.float32[::1], t.float32[:, ::1]
GEMV_SIG = (u32, u32, i32, i32, f2, f2, t.int64, t.int64, t.int64)


def ptxas() -> str:
    found = shutil.which("ptxas") or next(iter(sorted(glob.glob(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin/ptxas"))
                                                       + sorted(glob.glob("/usr/local/cuda*/bin/ptxas")), reverse=True)), None)
    if found is None:
        sys.exit("ptxas not found: install a CUDA toolkit or set CUDA_HOME")
    return found


def registers(py_func, sig, exe: str) -> str:
    ptx, _ = cuda.compile_ptx(py_func, sig, cc=(9, 0))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run([exe, "-arch=sm_90", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    lines = r.stderr.splitlines()
    used = [line.split("Used", 1)[1].strip() for line in lines if "registers" in line]
    if r.returncode or not used:
        sys.exit(f"ptxas failed: {r.stderr.strip()[:400]}")
    spills = [line.strip() for line in lines if "spill" in line and " 0 bytes spill stores" not in line]
    return used[0] + (f" ({spills[0]})" if spills else "")


def main() -> None:
    exe = ptxas()
    rows = []
    for qt, name in ((K.Q4_0, "Q4_0"), (K.Q8_0, "Q8_0")):
        cfg = K.FAST2[qt]
        # the variants a decode step launches: plain and fused, with the norm (the layers' norms), with the
        # residual (attn_output), preloaded where the type allows (_make_fast2); on interleaved weights (Small
        # 4's shapes) and on GGUF-ordered ones (the rest)
        pre = cfg.get("preload", False)
        for fused, preload, norm, residual, il in ((False, False, False, False, True), (True, False, False, False, True),
                                                   (True, False, True, False, True), (False, pre, True, False, True),
                                                   (False, pre, False, True, True), (True, False, True, False, False),
                                                   (False, pre, True, False, False)):
            k = K._make_fast2(qt, fused, cfg["warps"], cfg["direct"], preload, norm, residual, interleaved=il)
            sig = GEMV_SIG + (t.int64,) + ((f1, t.float32) if norm else ()) + ((f2,) if residual else ())
            label = " ".join(["fused" if fused else "plain"] + [v for v, on in (("preload", preload), ("norm", norm),
                                                                                ("residual", residual),
                                                                                ("GGUF order", not il)) if on])
            rows.append((f"fast2 {name} {label} (bps {cfg['bps'][fused]})", 32 * cfg["warps"], registers(k.py_func, sig, exe)))
        for cols in (128, 256):
            rows.append((f"lanes {name} cols={cols}", K.THREADS, registers(K._make_lanes(qt, cols, False).py_func, GEMV_SIG, exe)))
            rows.append((f"lanes {name} cols={cols} preload", K.THREADS,
                         registers(K._make_lanes(qt, cols, True).py_func, GEMV_SIG, exe)))
    for preload in (False, True):
        for norm in (False, True):
            sig = (t.uint8[::1], i32, i32, f2, f2, t.int64, t.int64, t.int64) + ((f1, t.float32) if norm else ())
            rows.append((f"f32rows (router){' preload' if preload else ''}{' norm' if norm else ''}", K.THREADS,
                         registers(K._make_f32rows(preload, norm).py_func, sig, exe)))
    f3, a3 = t.float32[:, :, ::1], t.float32[:, :, :]
    for dk, dv, v_is_k in ((128, 128, False), (320, 256, True), (320, 256, False)):
        rows.append((f"attention dk={dk} dv={dv}{' v_is_k' if v_is_k else ''}", K.THREADS, registers(
            K.attention_kernel(dk, dv, v_is_k).py_func, (f3, a3, a3, f3, i32, t.float32, t.int64), exe)))
    # mla_rope alone and with Small 4's W_kb [32, 256, 64] folded in
    for proj in (None, (K.Q4_0, 256, 64, False), (K.Q8_0, 256, 64, False)):
        sig = (f3, f2, i32, f2, f2, f1, t.float32, t.float64, t.int64, f2, f3, f3, f3 if proj is None else u32)
        rows.append(("mla_rope" + (f" + W_kb {proj[:3]}" if proj else ""), K.THREADS,
                     registers(K.mla_rope_kernel(proj).py_func, sig, exe)))
    print(f"{'kernel':44s} {'threads':>7s}  ptxas -v (sm_90)                       blocks/SM by registers")
    for name, threads, used in rows:
        n = int(used.split()[0])
        print(f"{name:44s} {threads:7d}  {used:38s} {REGS_PER_SM // (threads * n)}")


if __name__ == "__main__":
    main()
