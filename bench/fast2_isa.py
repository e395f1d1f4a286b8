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
    """PTX instructions by opcode (its first dotted part), those inside inline-asm blocks { ... } included."""
    c = collections.Counter()
    for line in ptx.splitlines():
        s = line.split("//", 1)[0].strip()
        if not s or s.startswith(".") or s.endswith(":") or s in ("{", "}", ")", "("):
            continue
        for ins in s.strip("{}").split(";"):
            ins = ins.strip().strip("{}").strip()
            if ins.startswith("@"):
                ins = ins.split(None, 1)[1] if " " in ins else ""
            if not ins or ins.startswith(".") or ins.startswith("_"):
                continue
            op = re.split(r"[\s.]", ins, 1)[0]
            if op.isidentifier():
                c[op] += 1
    return c


FLOAT_SASS = ("FFMA", "FMUL", "FADD", "MUFU", "FMNMX", "FCHK", "FSETP", "FSEL", "I2F", "I2FP", "F2I", "FRND",
              "HADD2", "IDP")


def ptx_float_ops(ptx: str) -> collections.Counter:
    """The float arithmetic (full opcodes with a .f32/.f16 type, loads, stores and moves aside): what must not
    change between two versions whose results are to be bitwise equal."""
    c = collections.Counter()
    for m in re.finditer(r"^\s*(?:@%?!?\w+\s+)?([a-z][a-z0-9]*(?:\.[a-z0-9]+)*)\s", ptx, re.M):
        op = m.group(1)
        if re.search(r"\.f(32|16)\b", op) and not op.startswith(("ld", "st", "mov")):
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
    c, full = collections.Counter(), collections.Counter()
    for line in r.stdout.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            c[m.group(1).split(".")[0]] += 1
            full[m.group(1)] += 1
    c.pop("NOP", None)
    # integer divisions (I2F.U32.RP, MUFU.RCP, F2I.FTZ.U32.TRUNC.NTZ) are not float math: counted apart
    idiv = sum(n for o, n in full.items() if o.startswith("I2F") and o.endswith(".RP"))
    sass_counts.float_ops = {k: c.get(k, 0) - (idiv if k in ("I2F", "MUFU", "F2I") else 0) for k in FLOAT_SASS}
    sass_counts.float_ops = {k: n for k, n in sass_counts.float_ops.items() if n}
    sass_counts.float_ops["(int divisions)"] = idiv
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
    fl = dict(sorted(ptx_float_ops(ptx).items()))
    sf = None if sass is None else dict(sass_counts.float_ops)
    idiv = None if sf is None else sf.pop("(int divisions)")
    return dict(label=label, ptx_float=fl, sass_float=sf, sass_int_divisions=idiv, regs=regs, spill_st=spills[0], spill_ld=spills[1], ptx=sum(pc.values()),
                ptx_ops=dict(pc.most_common()), sass=None if sass is None else sum(sass.values()),
                sass_ops=None if sass is None else dict(sass.most_common()))


def compare(before: str, after: str) -> None:
    with open(before) as f:
        b = {r["label"]: r for r in json.load(f)}
    with open(after) as f:
        a = {r["label"]: r for r in json.load(f)}
    print("| variant | registers | spills (st/ld bytes) | PTX instructions | SASS instructions | float ops equal |")
    print("|---|---|---|---|---|---|")
    for k in b:
        if k not in a:
            continue
        x, y = b[k], a[k]
        def norm(c):   # an exact int -> f32 convert is the same op from 32 or 64 bits (the values fit in 32)
            out = {}
            for o, n in (c or {}).items():
                o = re.sub(r"^cvt\.rn\.f32\.s(32|64)$", "cvt.rn.f32.s*", o)
                o = re.sub(r"^I2FP?(\.F32\.S(32|64))?$", "I2F*", o)
                out[o] = out.get(o, 0) + n
            return out
        diffs = [f"{o} {u.get(o, 0)}->{v.get(o, 0)}" for u, v in ((norm(x["ptx_float"]), norm(y["ptx_float"])),
                                                                 (norm(x["sass_float"]), norm(y["sass_float"])))
                 for o in sorted(set(u) | set(v)) if u.get(o, 0) != v.get(o, 0)]
        same = not diffs
        diff = "" if same else " (" + ", ".join(diffs) + ")"
        pct = lambda u, v: f"{u} -> {v} ({100 * (v - u) / u:+.0f}%)" if u and v else f"{u} -> {v}"
        print(f"| {k} | {x['regs']} -> {y['regs']} | {x['spill_st']}/{x['spill_ld']} -> {y['spill_st']}/{y['spill_ld']} "
              f"| {pct(x['ptx'], y['ptx'])} | {pct(x['sass'], y['sass'])} | {'yes' if same else 'NO'}{diff} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--dump")
    ap.add_argument("--only", help="substring of the variant labels to keep")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                    help="print a before/after table of two --json outputs (and whether the float ops match)")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
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
