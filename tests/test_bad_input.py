"""Bad input: one line on stderr, exit code 2, no traceback, no partial output file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from checkpoints import make_mixtral

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def localmoe(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmoe", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=600)


def assert_clean_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and "Compiling kernels" not in l]
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    src, _ = make_mixtral(d / "hf", layers=1)
    out = d / "good.gguf"
    r = localmoe("convert", src, out, "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    return src, out


def write_gguf(path: Path, arch: str, tensors: dict, kv: dict | None = None):
    w = gguf.GGUFWriter(path, arch)
    for k, v in (kv or {}).items():
        w.add_uint32(k, v)
    for name, (arr, raw_type) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def test_missing_file(tmp_path):
    assert_clean_error(localmoe("run", "-m", tmp_path / "nope.gguf", "hi"), "no such file")
    assert_clean_error(localmoe("info", tmp_path / "nope.gguf"), "no such file")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(os.urandom(4096))
    assert_clean_error(localmoe("run", "-m", p, "hi"), "not a GGUF")


def test_truncated_gguf(good, tmp_path):
    data = good[1].read_bytes()
    for cut in (40, len(data) // 3, len(data) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        assert_clean_error(localmoe("run", "-m", p, "hi"), "truncated")


def test_unknown_architecture(tmp_path):
    p = tmp_path / "arch.gguf"
    write_gguf(p, "gpt9", {"token_embd.weight": (np.random.rand(8, 32).astype(np.float32), None)})
    assert_clean_error(localmoe("run", "-m", p, "hi"), "unknown architecture", "gpt9")


def test_missing_tensor(good, tmp_path):
    from localmoe.gguf.reader import GGUFFile
    f = GGUFFile(good[1])
    p = tmp_path / "missing.gguf"
    w = gguf.GGUFWriter(p, "llama")
    for k, v in f.metadata.items():
        if k.startswith("llama.") and isinstance(v, int):
            w.add_uint32(k, v)
        elif k.startswith("llama.") and isinstance(v, float):
            w.add_float32(k, v)
    for name, ti in f.tensors.items():
        if name != "blk.0.attn_v.weight":
            w.add_tensor(name, f.array(name) if ti.type.name == "F32" else np.asarray(f.raw(name)), raw_dtype=ti.type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_clean_error(localmoe("run", "-m", p, "hi"), "blk.0.attn_v.weight")


def test_unsupported_quant_type(tmp_path):
    p = tmp_path / "q4k.gguf"
    raw = np.random.default_rng(0).integers(0, 255, (8, 144), dtype=np.uint8)   # one Q4_K block per row
    write_gguf(p, "llama", {"token_embd.weight": (raw, gguf.GGMLQuantizationType.Q4_K)},
               {"llama.block_count": 1, "llama.embedding_length": 256, "llama.attention.head_count": 2,
                "llama.expert_count": 2, "llama.expert_used_count": 1, "llama.context_length": 64})
    assert_clean_error(localmoe("run", "-m", p, "hi"), "unsupported type", "Q4_K")


def test_convert_source_not_a_checkpoint(tmp_path):
    out = tmp_path / "out.gguf"
    (tmp_path / "empty").mkdir()
    assert_clean_error(localmoe("convert", tmp_path / "empty", out), "not a checkpoint")
    assert_clean_error(localmoe("convert", tmp_path / "absent", out), "not a checkpoint")
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert_clean_error(localmoe("convert", bad, out), "unsupported architecture")
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_convert_truncated_shard_leaves_nothing(good, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for f in good[0].iterdir():
        data = f.read_bytes()
        (src / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    out = tmp_path / "out.gguf"
    assert_clean_error(localmoe("convert", src, out), "truncated")
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".out.gguf*"))


def test_convert_nan_weights_refused(tmp_path):
    """A diverged training run's checkpoint: the converter says which tensor, and writes nothing."""
    from safetensors.numpy import load_file, save_file
    src, _ = make_mixtral(tmp_path / "hf", layers=1)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("o_proj.weight"))
    tensors[name][3, 5] = np.nan
    save_file(tensors, shard)
    out = tmp_path / "out.gguf"
    assert_clean_error(localmoe("convert", src, out, "--quant", "q8_0"), "NaN or infinite", "attn_output")
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_usage_errors(good):
    assert_clean_error(localmoe("run", "-m", good[1], "--no-such-flag", "hi"), "--no-such-flag")
    assert_clean_error(localmoe("convert", good[0], "/tmp/x.gguf", "--quant", "q3_z"), "q3_z")
    assert_clean_error(localmoe("run", "-m", good[1], stdin=""), "no prompt")


def test_backend_choice(good):
    assert_clean_error(localmoe("run", "-m", good[1], "--backend", "tpu", "hi"), "unknown backend", "tpu")
    r = localmoe("run", "-m", good[1], "--backend", "auto", "--raw", "-n", "2", "hi")   # no GPU here: the CPU
    assert r.returncode == 0, r.stderr


def test_gpu_mem_errors(good):
    """--gpu-mem: a size that does not parse, and a cache on the CPU backend, are one-line errors."""
    assert_clean_error(localmoe("run", "-m", good[1], "--gpu-mem", "lots", "hi"), "--gpu-mem", "24G")
    assert_clean_error(localmoe("run", "-m", good[1], "--gpu-mem", "0G", "hi"), "--gpu-mem")
    assert_clean_error(localmoe("run", "-m", good[1], "--gpu-mem", "2G", "hi"), "--gpu-mem", "cuda backend")


def test_parse_size():
    from localmoe.cli import parse_size
    assert parse_size("24G") == 24 * 2 ** 30 and parse_size("512m") == 512 * 2 ** 20
    assert parse_size("1.5GiB") == 3 * 2 ** 29 and parse_size("4096") == 4096 and parse_size(None) is None


def test_prompt_longer_than_context(good):
    assert_clean_error(localmoe("run", "-m", good[1], "--ctx", "16", "word " * 100), "longer than the context")


def test_good_file_runs(good):
    r = localmoe("run", "-m", good[1], "-n", "4", "--verbose", "Hello")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "experts read" in r.stderr
