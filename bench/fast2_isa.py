"""Static instruction counts of the fast2 kernels, without a GPU: per variant, PTX instructions (total and the
top opcodes), ptxas -v registers / spills at the launch's cap (-maxrregcount = 65536 / threads, as
_make_fast2's max_registers) and, where nvdisasm (or cuobjdump) is found, SASS instructions.

Needs numba-cuda with its NVVM and a ptxas (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin); for SASS counts
nvdisasm or cuobjdump on PATH (pip install nvidia-cuda-nvdisasm / nvidia-cuda-cuobjdump: the CUDA 13 tools
read sm_90 cubins).
    python bench/fast2_isa.py                 # table
    python bench/fast2_isa.py --json out.json # also the numbers as JSON (compare two trees)
    python bench/fast2_isa.py --dump DIR      # also each variant's .ptx / .sass into DIR
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from numba import types as t

from localmoe.backends.cuda import kernels as K
from localmoe.backends.cuda._numba import cuda

sys.path.insert(0, os.path.dirname(__file__))
from kernel_registers import GEMV_SIG, f1, f2, ptxas  # noqa: E402


def variants():
    """(label, qt, fused, preload, norm, residual): every fast2 variant launch_fast2 can pick (FAST2's config)."""
    out = []
    for qt, name in ((K.Q4_0, "Q4_0"), (K.Q8_0, "Q8_0")):
        pre_ok = K.FAST2[qt].get("preload", False)
        for fused in (False, True):
            for preload in ((False, True) if pre_ok and not fused else (False,)):
                for norm in (False, True):
                    for residual in ((False, True) if not fused else (False,)):
                        label = " ".join([name, "fused" if fused else "plain"] + [v for v, on in (
                            ("preload", preload), ("norm", norm), ("residual", residual)) if on])
                        out.append((label, qt, fused, preload, norm, residual))
    return out


def ptx_counts(ptx: str) -> collections.Counter:
    c = collections.Counter()
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "@%", "$")) and not s.startswith("@"):
            continue
        if s.startswith("@"):
            s = s.split(None, 1)[1] if " " in s else ""
        if not s or s.endswith(":") or s.startswith((".", "{", "}")):
            continue
        op = re.split(r"[\s.;]", s, 1)[0]
        if op:
            c[op] += 1
    return c


def sass_counts(cubin: str) -> collections.Counter | None:
    tool = shutil.which("nvdisasm")
    if tool:
        r = subprocess.run([tool, "-c", cubin], capture_output=True, text=True)
    else:
        tool = shutil.which("cuobjdump")
        if not tool:
            return None
        r = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True)
    c = collections.Counter()
    for line in r.stdout.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            c[m.group(1).split(".")[0]] += 1
    c.pop("NOP", None)
    return c


def analyse(label, qt, fused, preload, norm, residual, exe, dump=None):
    cfg = K.FAST2[qt]
    warps = cfg["warps"]
    k = K._make_fast2(qt, fused, warps, cfg["direct"], preload, norm, residual)
    sig = GEMV_SIG + (t.int64,) + ((f1, t.float32) if norm else ()) + ((f2,) if residual else ())
    ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))
    cap = 65536 // (32 * warps)
    with tempfile.TemporaryDirectory() as d:
        p, cub = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-arch=sm_90", "-v", f"-maxrregcount={cap}", p, "-o", cub], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"ptxas failed: {r.stderr[:400]}")
        regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        spills = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        sass = sass_counts(cub)
        if dump:
            os.makedirs(dump, exist_ok=True)
            base = os.path.join(dump, label.replace(" ", "_"))
            shutil.copy(p, base + ".ptx")
            tool = shutil.which("nvdisasm")
            if tool:
                with open(base + ".sass", "w") as f:
                    f.write(subprocess.run([tool, "-c", cub], capture_output=True, text=True).stdout)
    pc = ptx_counts(ptx)
    return dict(label=label, regs=regs, spill_st=spills[0], spill_ld=spills[1], ptx=sum(pc.values()),
                ptx_ops=dict(pc.most_common()), sass=None if sass is None else sum(sass.values()),
                sass_ops=None if sass is None else dict(sass.most_common()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--dump")
    ap.add_argument("--only", help="substring of the variant labels to keep")
    a = ap.parse_args()
    exe = ptxas()
    res = []
    for v in variants():
        if a.only and a.only not in v[0]:
            continue
        res.append(analyse(*v, exe=exe, dump=a.dump))
        r = res[-1]
        top = " ".join(f"{k}:{n}" for k, n in list(r["ptx_ops"].items())[:6])
        stop = "" if r["sass"] is None else " ".join(f"{k}:{n}" for k, n in list(r["sass_ops"].items())[:6])
        print(f"{r['label']:36s} regs {r['regs']:3d} spill {r['spill_st']}/{r['spill_ld']}  ptx {r['ptx']:5d} ({top})"
              f"  sass {r['sass']} ({stop})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
