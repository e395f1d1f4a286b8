"""Only the routed experts' bytes are read.

1. Poisoning: every expert the router did not pick is overwritten with NaN blocks in a copy of the file;
   generation must be unchanged. 2. A >= 1 GB checkpoint: RSS grows by less than half the file while
   generating, and the expert bytes counted equal the selected experts' bytes computed from the file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import localmoe
from convert import convert
from convert.synthetic import write_checkpoint
from localmoe.gguf.reader import GGUFFile

from checkpoints import TEKKEN, make_mistral4

EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def is_expert_tensor(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[2] in EXPERT_TENSORS


def selected(stats) -> set[tuple[int, int]]:
    return {(layer, int(e)) for _, layer, ids in stats.routing for e in np.unique(ids)}


def expected_bytes(f: GGUFFile, stats) -> int:
    per_layer = {}
    for name, ti in f.tensors.items():
        if is_expert_tensor(name):
            layer = int(name.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + ti.nbytes // ti.shape[0]
    return sum(len(np.unique(ids)) * per_layer[layer] for _, layer, ids in stats.routing)


def test_unselected_experts_are_never_read(tmp_path):
    src, _ = make_mistral4(tmp_path / "hf", experts=32, layers=2, seed=3)
    path = tmp_path / "m.gguf"
    convert(src, path, "q8_0")
    prompt = [1] + np.random.default_rng(0).integers(1000, 131072, 5).tolist()
    m = localmoe.load(path)
    m.stats.keep_routing = True
    tokens = list(m.generate(prompt, max_tokens=8, stop=()))
    used = selected(m.stats)
    assert m.stats.expert_bytes == expected_bytes(m.file, m.stats)
    assert len(used) < 2 * 32                                   # some experts were not picked

    poisoned = tmp_path / "poisoned.gguf"
    data = bytearray(path.read_bytes())
    f = GGUFFile(path)
    n_poisoned = 0
    for name, ti in f.tensors.items():
        parts = name.split(".")
        if not is_expert_tensor(name):
            continue
        per = ti.nbytes // ti.shape[0]
        for e in range(ti.shape[0]):
            if (int(parts[1]), e) not in used:
                data[ti.offset + e * per: ti.offset + (e + 1) * per] = b"\xff" * per   # f16 scales = NaN
                n_poisoned += 1
    f.close()
    poisoned.write_bytes(bytes(data))
    assert n_poisoned > 0
    m2 = localmoe.load(poisoned)
    assert list(m2.generate(prompt, max_tokens=8, stop=())) == tokens
    assert np.isfinite(m2.logits(prompt)).all()


RSS_SCRIPT = r"""
import sys, json, numpy as np, localmoe
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):   # file-backed resident pages: the mapped model
            return int(line.split()[1]) * 1024
m = localmoe.load(sys.argv[1])
m.stats.keep_routing = True
before = rss()
toks = list(m.generate([1, 5000, 6000, 7000], max_tokens=16, stop=()))
from test_streaming import expected_bytes
print(json.dumps({"grew": rss() - before, "tokens": len(toks), "counted": m.stats.expert_bytes,
                  "expected": expected_bytes(m.file, m.stats), "reads": m.stats.expert_reads}))
"""


def test_large_model_reads_only_selected_experts(tmp_path):
    # hidden 256, 10 layers of 256 experts of width 128, 32k vocabulary: 1.07 GB in f32, 94% experts
    src = write_checkpoint(tmp_path / "hf", TEKKEN, vocab_size=32768, hidden_size=256, num_hidden_layers=10,
                           num_attention_heads=4,
                           q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
                           n_routed_experts=256, moe_intermediate_size=128)
    assert sum(f.stat().st_size for f in src.glob("*.safetensors")) >= 1 << 30
    path = tmp_path / "big.gguf"
    convert(src, path, "f32")
    size = path.stat().st_size
    with open(path, "rb") as fh:    # start cold, as a model larger than RAM would: nothing cached
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).parent), timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n  file {size / 2**20:.0f} MiB, RSS grew {out['grew'] / 2**20:.0f} MiB, expert reads {out['reads']}")
    assert out["tokens"] == 16
    assert out["counted"] == out["expected"]
    assert out["grew"] < size / 2
