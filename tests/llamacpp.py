"""llama.cpp as a second reference: its own HF->GGUF converter and its runtime (llama-cpp-python).

Helpers for the interoperability tests:

- ``ensure_llama_cpp_src()``: a directory holding llama.cpp's ``convert_hf_to_gguf.py``,
  ``conversion/`` and ``gguf-py/`` from the pinned llama-cpp-python sdist (never edited).
- ``llama_convert(hf_dir, out, outtype)``: runs llama.cpp's OWN converter in a subprocess
  (outtypes f32/f16/bf16/q8_0; q4_0 = f16 conversion + ``llama_cpp.llama_model_quantize``).
- ``llama_logits(gguf_path, ids)``: all-position logits from llama-cpp-python.
- ``make_mistral3_wrapper(src, out)``: re-packs a tiny ``Mistral4ForCausalLM`` checkpoint as the
  ``Mistral3ForConditionalGeneration`` layout the real Small 4 checkpoint uses.
- ``gguf_summary(path)``: tensor names / shapes / types and metadata of a GGUF (for docs & tests).

llama.cpp's converter cannot convert mistral4 on its own (see docs/LLAMACPP.md, section d):
it only registers mistral4 inside ``Mistral3ForConditionalGeneration`` and its DeepSeek vocabulary
code rejects tekken. The bypass lives in ``_driver_convert`` below (run as
``python tests/llamacpp.py _convert ...``): it imports the converter as a module and patches it
in memory; the sdist's files are never modified.

Environment:
- ``LLAMA_CPP_SRC``: a directory containing ``vendor/llama.cpp`` (an extracted sdist) or the
  llama.cpp root itself (with ``convert_hf_to_gguf.py``). If unset, ``.venv/llama.cpp-src`` is
  used and populated on first use from ``LLAMA_CPP_SDIST`` (a local sdist .tar.gz) or with
  ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".venv" / "llama.cpp-src"
# what the converter needs from the sdist (src/ is extracted too: docs cite the runtime)
_SDIST_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "src/", "LICENSE")

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


# --------------------------------------------------------------------------------------------
# the sdist
# --------------------------------------------------------------------------------------------

def _llama_root(path: Path) -> Path | None:
    for cand in (path, path / "vendor" / "llama.cpp"):
        if (cand / "convert_hf_to_gguf.py").is_file() and (cand / "gguf-py").is_dir():
            return cand
    return None


def _extract_sdist(tar_path: Path, dest: Path) -> None:
    """Extract vendor/llama.cpp/{converter, conversion, gguf-py, templates, src} into dest/vendor/llama.cpp."""
    tmp = Path(tempfile.mkdtemp(prefix="llama-src-", dir=dest.parent))
    try:
        with tarfile.open(tar_path) as tf:
            members = []
            for m in tf.getmembers():
                parts = m.name.split("/", 1)  # "llama_cpp_python-0.3.36/..."
                if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                    continue
                rel = parts[1][len("vendor/llama.cpp/"):]
                if not any(rel == p or rel.startswith(p) for p in _SDIST_MEMBERS):
                    continue
                if not (m.isfile() or m.isdir()):
                    continue
                m.name = "vendor/llama.cpp/" + rel
                members.append(m)
            tf.extractall(tmp, members=members, filter="data")
        if _llama_root(tmp) is None:
            raise RuntimeError(f"{tar_path} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        (tmp / "SOURCE").write_text(f"{tar_path.name}\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_llama_cpp_src() -> Path:
    """Return llama.cpp's source root (the dir with convert_hf_to_gguf.py) from the pinned sdist."""
    env = os.environ.get("LLAMA_CPP_SRC")
    if env:
        root = _llama_root(Path(env))
        if root is None:
            raise FileNotFoundError(f"LLAMA_CPP_SRC={env} has no (vendor/llama.cpp/)convert_hf_to_gguf.py")
        return root
    root = _llama_root(CACHE_DIR)
    if root is not None:
        return root
    CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
    sdist = os.environ.get("LLAMA_CPP_SDIST")
    if sdist:
        _extract_sdist(Path(sdist), CACHE_DIR)
    else:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", d,
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True)
            tars = sorted(Path(d).glob("llama_cpp_python-*.tar.gz"))
            if not tars:
                raise RuntimeError("pip download produced no llama-cpp-python sdist")
            _extract_sdist(tars[0], CACHE_DIR)
    root = _llama_root(CACHE_DIR)
    assert root is not None
    return root


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------

def llama_convert(hf_dir: Path, out: Path, outtype: str = "f32", *, timeout: float = 600,
                  q4_pure: bool = False) -> Path:
    """Convert an HF checkpoint dir with llama.cpp's own converter; returns the GGUF path.

    outtype: f32 / f16 / bf16 / q8_0 (the converter's own types) or q4_0 (converter -> f16 ->
    ``llama_model_quantize`` with LLAMA_FTYPE_MOSTLY_Q4_0, llama.cpp's official Q4_0 path; by
    default llama.cpp keeps its mixed choices, e.g. output.weight as Q6_K; ``q4_pure=True`` asks
    for Q4_0 everywhere it can).
    Raises subprocess.CalledProcessError (with the converter's log as .output) on failure.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = ensure_llama_cpp_src()
    if outtype == "q4_0":
        tmp = out.with_name(out.stem + ".f16-tmp.gguf")
        try:
            llama_convert(hf_dir, tmp, "f16", timeout=timeout)
            llama_quantize(tmp, out, "q4_0", pure=q4_pure, timeout=timeout)
        finally:
            tmp.unlink(missing_ok=True)
        return out
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "gguf-py")])
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_convert", str(src), str(hf_dir), str(out), outtype]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not out.is_file():
        raise subprocess.CalledProcessError(r.returncode, cmd, output=r.stdout + r.stderr)
    return out


def llama_quantize(src_gguf: Path, out: Path, qtype: str = "q4_0", *, pure: bool = False,
                   timeout: float = 600) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_quantize", str(src_gguf), str(out), qtype,
           "1" if pure else "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not Path(out).is_file():
        raise subprocess.CalledProcessError(r.returncode, cmd, output=r.stdout + r.stderr)
    return Path(out)


def make_mistral3_wrapper(src: Path, out: Path, *, vision: dict | None = None) -> Path:
    """Re-pack a Transformers ``Mistral4ForCausalLM`` checkpoint as a ``Mistral3ForConditionalGeneration``
    one (the real Small 4 layout): config with ``text_config`` (mistral4) + a tiny pixtral
    ``vision_config``, text tensors renamed to ``language_model.model.*`` / ``language_model.lm_head.weight``
    (Transformers 5.23's on-disk names). No vision tensors are written: llama.cpp's text
    conversion skips them anyway."""
    from safetensors.numpy import load_file, save_file
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = json.loads((src / "config.json").read_text())
    text_cfg.pop("transformers_version", None)
    vcfg = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_channels": 3, "image_size": 56, "patch_size": 14,
            "rope_theta": 10000.0, "head_dim": 16, "hidden_act": "silu"}
    vcfg.update(vision or {})
    cfg = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
           "text_config": text_cfg, "vision_config": vcfg, "image_token_index": 10,
           "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
           "spatial_merge_size": 2, "vision_feature_layer": -1,
           "tie_word_embeddings": text_cfg.get("tie_word_embeddings", False)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(f).items():
            if k.startswith("model."):
                tensors["language_model." + k] = v
            elif k == "lm_head.weight":
                tensors["language_model.lm_head.weight"] = v
            else:
                tensors[k] = v
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for extra in ("tekken.json", "tokenizer.model", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
    return out


# --------------------------------------------------------------------------------------------
# runtime
# --------------------------------------------------------------------------------------------

_LOG_CB = None


def _quiet_llama_log() -> None:
    """Silence llama.cpp's C log. (llama-cpp-python 0.3.36 maps ggml's log levels with an old
    enum, so WARN lines such as 'setting new yarn_attn_factor' leak even with verbose=False.)"""
    global _LOG_CB
    if _LOG_CB is None:
        import ctypes
        import llama_cpp
        import llama_cpp._logger  # noqa: F401  (installs its own callback on import; replace it)

        @llama_cpp.llama_log_callback
        def _silent(level, text, user_data):
            return None
        _LOG_CB = _silent
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def llama_logits(gguf_path: Path, ids: list[int], *, n_ctx: int | None = None, n_threads: int = 2,
                 kv_f32: bool = True):
    """All-position logits (float32 [len(ids), n_vocab]) from llama-cpp-python.

    No BOS is added (the ids are evaluated as given). The KV cache is F32 by default
    (llama.cpp's default F16 cache costs ~1e-3 relative error) so the numbers are a clean
    reference; single sequence, fixed threads: deterministic."""
    import numpy as np
    from llama_cpp import Llama
    import llama_cpp
    _quiet_llama_log()
    ids = [int(i) for i in ids]
    n = len(ids)
    n_ctx = n_ctx or max(64, n)
    kw = {}
    if kv_f32:
        kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=max(n, 1),
                n_ubatch=max(n, 1), n_threads=n_threads, n_threads_batch=n_threads,
                verbose=False, seed=0, **kw)
    try:
        llm.reset()
        llm.eval(ids)
        out = np.array(llm.scores[:n], dtype=np.float32, copy=True)
    finally:
        llm.close()
    return out


def gguf_summary(path: Path) -> dict:
    """{'arch', 'metadata': {key: value}, 'tensors': {name: (numpy_shape, ggml_ne, type_name)}}."""
    from localmoe.gguf.reader import GGUFFile
    f = GGUFFile(path)
    out = {name: (ti.shape, tuple(reversed(ti.shape)), ti.type.name) for name, ti in f.tensors.items()}
    return {"arch": f.get("general.architecture"), "metadata": f.metadata, "tensors": out}


def gguf_tensor(path: Path, name: str):
    """One tensor as a float32 numpy array (numpy order), dequantized if needed."""
    import numpy as np
    from gguf.quants import dequantize
    from localmoe.gguf.reader import GGUFFile
    f = GGUFFile(path)
    ti = f.info(name)
    return np.asarray(dequantize(f.raw(name), ti.type), np.float32).reshape(ti.shape).copy()


def logit_agreement(ref, got) -> dict:
    """max|diff|/max|ref|, mean KL(softmax(ref) || softmax(got)) per position, argmax agreement."""
    import numpy as np
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    rel = float(np.abs(ref - got).max() / np.abs(ref).max())

    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsm(ref), logsm(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return {"rel_max_diff": rel, "mean_kl": kl, "top1_agree": top1}


# --------------------------------------------------------------------------------------------
# subprocess drivers (run as: python tests/llamacpp.py _convert|_quantize ...)
# --------------------------------------------------------------------------------------------

def _driver_convert(src: str, hf_dir: str, out: str, outtype: str) -> None:
    src_p = Path(src)
    sys.path.insert(0, str(src_p / "gguf-py"))
    sys.path.insert(0, str(src_p))
    import convert_hf_to_gguf as cv  # noqa: E402  (llama.cpp's own script, imported as a module)
    import conversion  # noqa: E402
    from conversion.base import ModelBase, ModelType  # noqa: E402
    from conversion.mistral3 import Mistral3Model  # noqa: E402
    from conversion.mistral import MistralModel  # noqa: E402

    # Bypass 1: llama.cpp registers mistral4 only under Mistral3ForConditionalGeneration;
    # route a plain Mistral4ForCausalLM checkpoint to the very same class (Mistral3Model
    # dispatches on model_type == "mistral4" to its inner Mistral4Model(DeepseekV2Model)).
    conversion.TEXT_MODEL_MAP.setdefault("Mistral4ForCausalLM", "mistral3")
    ModelBase._model_classes[ModelType.TEXT].setdefault("Mistral4ForCausalLM", Mistral3Model)

    # Bypass 2: Mistral4Model inherits DeepseekV2Model.set_vocab, which needs an HF
    # tokenizer.json and, for tekken, raises "Deepseek pre-tokenizer 'tekken' is not supported yet!".
    # Use llama.cpp's own Mistral vocabulary writer instead (mistral-common Tekkenizer ->
    # tokenizer.ggml.model "gpt2", pre "tekken", merges), as its Mistral-format path does.
    def _set_vocab(self):
        if (self.dir_model / "tekken.json").is_file() and not (self.dir_model / "tokenizer.json").is_file():
            return self._set_vocab_mistral()
        return type(self).__mro__[1].set_vocab(self)
    Mistral3Model.Mistral4Model.set_vocab = _set_vocab

    # Bypass 3: its community chat-template table knows no tokenizer v15 (Small 4) and raises
    # ValueError; write no chat template in that case instead of failing.
    orig_tmpl = MistralModel.get_community_chat_template

    def _tmpl(vocab, templates_dir, is_mistral_format):
        try:
            return orig_tmpl(vocab, templates_dir, is_mistral_format)
        except (ValueError, FileNotFoundError) as e:
            cv.logger.warning("no chat template written: %s", e)
            return None
    MistralModel.get_community_chat_template = staticmethod(_tmpl)

    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype]
    cv.main()


def _driver_quantize(src_gguf: str, out: str, qtype: str, pure: str) -> None:
    import ctypes
    import llama_cpp
    ftypes = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
              "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[qtype]
    params.nthread = 2
    params.pure = pure == "1"
    rc = llama_cpp.llama_model_quantize(src_gguf.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "_convert":
        _driver_convert(*rest)
    elif cmd == "_quantize":
        _driver_quantize(*rest)
    elif cmd == "summary":
        print(json.dumps(gguf_summary(Path(rest[0])), indent=1, default=str))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
