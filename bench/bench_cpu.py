"""CPU benchmark: localmoe vs llama.cpp (llama-cpp-python) on the same scaled-down Small 4 Q8_0 GGUF.

Prints, in one run: decode and prefill tok/s of both and their ratio, time to first token with a
warm Numba cache, GGUF open time (ours vs gguf.GGUFReader) for a 131k vocabulary, peak RSS of the
conversion, and decode against the DRAM roofline (bytes read per token / measured bandwidth).
`--write docs/PERFORMANCE.md` replaces the CPU section of that file with the results.

    python bench/bench_cpu.py [--threads 2] [--work DIR] [--write docs/PERFORMANCE.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT, DECODE = 512, 64


def child(code: str, threads: int) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        sys.exit(f"benchmark step failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


CONVERT = """
import json, resource, time
from convert import convert
t = time.perf_counter(); convert({src!r}, {out!r}, "q8_0"); dt = time.perf_counter() - t
print(json.dumps({{"seconds": dt, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

OURS = """
import json, time, numpy as np, localmoe
from localmoe.backends.cpu import kernels
t = time.perf_counter(); m = localmoe.load({path!r}); load = time.perf_counter() - t
rng = np.random.default_rng(0)
prompt = [1] + rng.integers(1000, 131072, {prompt} - 1).tolist()
m.logits(prompt[:8])                                   # warm: kernels from the cache, pages touched
t = time.perf_counter(); cache = m.new_cache(); m.prefill(np.array(prompt), cache); pp = time.perf_counter() - t
t = time.perf_counter(); first = next(m.generate(prompt[:16], max_tokens=1)); ttft = time.perf_counter() - t
m.stats.reset()
t = time.perf_counter(); n = len(list(m.generate(prompt[:16], max_tokens={decode}, stop=()))); t_all = time.perf_counter() - t
cache = m.new_cache(); m.prefill(np.array(prompt[:16]), cache)
t = time.perf_counter()
tok = 1000
for _ in range({decode}):
    tok = int(np.argmax(m.net.forward(np.array([tok]), cache, last_only=True)[-1]))
tg = time.perf_counter() - t
print(json.dumps({{"load": load, "prefill_tps": {prompt} / pp, "ttft": ttft, "decode_tps": {decode} / tg,
                  "expert_bytes_per_token": m.stats.expert_bytes / max(1, m.stats.tokens)}}))
"""

LLAMA = """
import json, time, numpy as np, llama_cpp
m = llama_cpp.Llama({path!r}, n_ctx=2048, n_threads={threads}, n_threads_batch={threads}, n_batch=512,
                    verbose=False, logits_all=False)
rng = np.random.default_rng(0)
prompt = [1] + rng.integers(1000, 131072, {prompt} - 1).tolist()
m.eval(prompt[:8]); m.reset()
t = time.perf_counter(); m.eval(prompt); pp = time.perf_counter() - t
m.reset(); m.eval(prompt[:16])
t = time.perf_counter()
for _ in range({decode}):
    m.eval([int(np.argmax(m.scores[m.n_tokens - 1]))])
tg = time.perf_counter() - t
print(json.dumps({{"prefill_tps": {prompt} / pp, "decode_tps": {decode} / tg}}))
"""

OPEN = """
import json, time
from localmoe.gguf.reader import GGUFFile
from localmoe.tokenizer import load_tokenizer
import gguf
t = time.perf_counter(); f = GGUFFile({path!r}); ours = time.perf_counter() - t
t = time.perf_counter(); load_tokenizer(f.metadata); tok = time.perf_counter() - t
t = time.perf_counter(); gguf.GGUFReader({path!r}); theirs = time.perf_counter() - t
print(json.dumps({{"ours": ours, "tokenizer": tok, "gguf_reader": theirs, "tokens": len(f.metadata["tokenizer.ggml.tokens"])}}))
"""

BANDWIDTH = """
import json, time, numpy as np
a = np.ones(1 << 28, np.uint8); b = np.empty_like(a)
best = 0
for _ in range(5):
    t = time.perf_counter(); np.copyto(b, a); best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
print(json.dumps({"copy_gbs": best / 1e9}))
"""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / ".scratch" / "bench")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    import mistral_common

    from convert.synthetic import SMALL4_SCALED, write_checkpoint

    work = args.work
    src, path = work / "hf", work / "small4-scaled-q8_0.gguf"
    if not (src / "config.json").exists():
        print("writing the synthetic checkpoint ...", file=sys.stderr)
        write_checkpoint(src, Path(mistral_common.__file__).parent / "data" / "tekken_240718.json")
    size_ckpt = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print("converting ...", file=sys.stderr)
    conv = child(CONVERT.format(src=str(src), out=str(path)), args.threads)
    print("running localmoe ...", file=sys.stderr)
    ours = child(OURS.format(path=str(path), prompt=PROMPT, decode=DECODE), args.threads)
    print("running llama.cpp ...", file=sys.stderr)
    peer = child(LLAMA.format(path=str(path), prompt=PROMPT, decode=DECODE, threads=args.threads), args.threads)
    opened = child(OPEN.format(path=str(path)), args.threads)
    bw = child(BANDWIDTH, 1)

    from localmoe.gguf.reader import GGUFFile
    f = GGUFFile(path)
    dense = sum(t.nbytes for n, t in f.tensors.items() if "_exps" not in n and n != "token_embd.weight")
    per_token = dense + ours["expert_bytes_per_token"]
    roofline = bw["copy_gbs"] * 1e9 / per_token
    date = datetime.date.today().isoformat()
    cmd = f"python bench/bench_cpu.py --threads {args.threads}"
    lines = [
        f"## CPU: localmoe vs llama.cpp ({date})",
        "",
        f"Machine: {machine()}; {args.threads} threads. Command: `{cmd}` (via `make bench`).",
        f"Model: synthetic Small 4 scaled down ({', '.join(f'{k}={v}' for k, v in SMALL4_SCALED.items())}), "
        f"Q8_0, {path.stat().st_size / 2**20:.0f} MiB, random weights. Prompt {PROMPT} tokens, decode {DECODE} tokens, greedy.",
        "",
        "| measure | localmoe | llama.cpp (llama-cpp-python 0.3.36) | ratio |",
        "|---|---:|---:|---:|",
        f"| decode tok/s | {ours['decode_tps']:.1f} | {peer['decode_tps']:.1f} | {ours['decode_tps'] / peer['decode_tps']:.2f}x |",
        f"| prefill tok/s ({PROMPT} tokens) | {ours['prefill_tps']:.1f} | {peer['prefill_tps']:.1f} | {ours['prefill_tps'] / peer['prefill_tps']:.2f}x |",
        "",
        f"- Decode vs the DRAM roofline: {per_token / 2**20:.1f} MiB read per token (dense weights + "
        f"{ours['expert_bytes_per_token'] / 2**20:.1f} MiB of routed experts); measured copy bandwidth "
        f"{bw['copy_gbs']:.1f} GB/s -> roofline {roofline:.0f} tok/s; localmoe reaches "
        f"{ours['decode_tps'] / roofline:.0%} of it, llama.cpp {peer['decode_tps'] / roofline:.0%}.",
        f"- Time to first token (16-token prompt, warm Numba cache, model loaded): {ours['ttft'] * 1000:.0f} ms; "
        f"model load {ours['load']:.2f} s.",
        f"- GGUF open ({opened['tokens']} tokens in the vocabulary): localmoe {opened['ours'] * 1000:.0f} ms "
        f"(+ tokenizer {opened['tokenizer'] * 1000:.0f} ms), gguf.GGUFReader {opened['gguf_reader'] * 1000:.0f} ms.",
    ]
    lines.append(f"- Conversion of the {size_ckpt / 2**30:.2f} GiB f32 checkpoint to Q8_0: {conv['seconds']:.0f} s, "
                 f"peak RSS {conv['peak_rss'] / 2**20:.0f} MiB (streamed row blocks of at most 16 MiB).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(args.write, "## CPU: localmoe vs llama.cpp", text)


def write_section(doc: Path, heading: str, text: str) -> None:
    """Replace the section starting with `heading` (up to the next '## ') in doc, or append it."""
    old = doc.read_text() if doc.exists() else "# Performance\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(doc)


if __name__ == "__main__":
    main()
