"""Vision encoder benchmark (CPU): seconds per image for the Pixtral encoder + projector.

Two random-weight mmproj files are written by the real converter's plan (convert/vision.py) from a
checkpoint stand-in that serves random tensors: the tiny test shape and a Small-4-sized encoder
(24 layers, hidden 1024, 16 heads, FFN 4096, projecting to 4096). Images of 512x512 and 1024x768 go
through mistral-common's size rule (-> 532x532 and 1036x784 pixels: 1444 and 4144 patches).

    python bench/bench_vision.py [--threads 2] [--quant q8_0] [--work DIR] [--write docs/PERFORMANCE.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=128, text=64),
    "Small-4-sized": dict(hidden=1024, layers=24, heads=16, ffn=4096, text=4096),
}
IMAGES = [(512, 512), (1024, 768)]
SECTION = "## Vision encoder (CPU)"


class RandomCheckpoint:
    """What convert.vision.plan reads from a checkpoint (shape, rows, get), with random values."""

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int, text: int, patch: int = 14, seed: int = 0):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        t, mm = "vision_tower.", "multi_modal_projector."
        self.shapes = {t + "patch_conv.weight": (hidden, 3, patch, patch), t + "ln_pre.weight": (hidden,),
                       mm + "norm.weight": (hidden,), mm + "patch_merger.merging_layer.weight": (hidden, 4 * hidden),
                       mm + "linear_1.weight": (text, hidden), mm + "linear_2.weight": (text, text),
                       "embed_tokens.weight": (131072, text)}
        for i in range(layers):
            p = f"{t}transformer.layers.{i}."
            self.shapes.update({p + "attention_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
                                p + "feed_forward.gate_proj.weight": (ffn, hidden),
                                p + "feed_forward.up_proj.weight": (ffn, hidden),
                                p + "feed_forward.down_proj.weight": (hidden, ffn)})
            self.shapes.update({p + f"attention.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})

    def shape(self, name):
        return self.shapes[name]

    def rows(self, name, lo=0, hi=None):
        import numpy as np

        shape = self.shapes[name]
        hi = shape[0] if hi is None else hi
        if len(shape) == 1:
            return 1 + 0.1 * self.rng.standard_normal(hi - lo, dtype=np.float32)
        return self.rng.standard_normal((hi - lo,) + shape[1:], dtype=np.float32) * np.float32(shape[-1] ** -0.5)

    def get(self, name):
        return self.rows(name)


def write_mmproj(path: Path, quant: str, hidden, layers, heads, ffn, text) -> Path:
    from convert import vision
    from convert.writer import write_gguf
    from localmoe.gguf.format import QUANT_CHOICES

    ck = RandomCheckpoint(hidden, layers, heads, ffn, text)
    vc = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
              patch_size=14, image_size=1540, rope_theta=10000.0, spatial_merge_size=2, projection_dim=text,
              projector_norm_eps=1e-6, source_architecture="random (bench_vision)")
    write_gguf(path, vision.ARCH, lambda w: vision.add_metadata(w, vc, vision.CLIP_MEAN, vision.CLIP_STD),
               vision.plan(ck, vc, 12), QUANT_CHOICES[quant])
    return path


def time_encoder(path: Path, runs: int) -> dict:
    """Seconds per image (best of `runs`) for each benchmark size, after a warm-up encode."""
    import numpy as np

    from localmoe.model import make_backend
    from localmoe.vision import Vision, target_size

    v = Vision(path, make_backend("cpu"))
    rng = np.random.default_rng(0)
    v.encoder.encode(rng.standard_normal((3, 56, 56), dtype=np.float32))
    out = {}
    for w, h in IMAGES:
        W, H = target_size(w, h, v.spec)
        image = rng.standard_normal((3, H, W), dtype=np.float32)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            v.encoder.encode(image)
            times.append(time.perf_counter() - t)
        out[(w, h)] = dict(seconds=min(times), pixels=(W, H), patches=(W // 14) * (H // 14), tokens=(W // 28) * (H // 28))
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}"


def report(results: dict, args) -> str:
    lines = [f"{SECTION} ({datetime.date.today().isoformat()})", "",
             f"Machine: {machine()}; {args.threads} threads. Command: "
             f"`python bench/bench_vision.py --threads {args.threads} --quant {args.quant}`.",
             f"Encoder + projector (`localmoe/models/pixtral.py`) on random-weight {args.quant} mmproj files "
             "written by the converter's plan; time per image, best of the runs, Numba cache warm. "
             "Input sizes after mistral-common's size rule.", "",
             "| encoder | image | resized to | patches | tokens | seconds / image |", "|---|---|---|---:|---:|---:|"]
    for name, res in results.items():
        d = SHAPES[name]
        label = f"{name} ({d['layers']} layers, hidden {d['hidden']}, FFN {d['ffn']})"
        for (w, h), r in res.items():
            lines.append(f"| {label} | {w}x{h} | {r['pixels'][0]}x{r['pixels'][1]} | {r['patches']} | "
                         f"{r['tokens']} | {r['seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def write_section(doc: Path, text: str) -> None:
    """Append the section, or replace an earlier copy of it (only this section is touched)."""
    old = doc.read_text() if doc.exists() else "# Performance\n"
    start = old.find(SECTION)
    if start < 0:
        doc.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = old.find("\n## ", start + len(SECTION))
    doc.write_text(old[:start] + text + (old[end + 1:] if end >= 0 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per size (best kept); the tiny one runs 5x this")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vision-"))
    results = {}
    for name, dims in SHAPES.items():
        path = write_mmproj(work / f"{name}.mmproj.gguf", args.quant, **dims)
        results[name] = time_encoder(path, args.runs * (5 if name == "tiny" else 1))
        for (w, h), r in results[name].items():
            print(f"{name:>14} {w}x{h}: {r['seconds']:.3f} s/image ({r['patches']} patches)", flush=True)
    text = report(results, args)
    print(text)
    if args.write:
        write_section(args.write, text)


if __name__ == "__main__":
    main()
