"""GGUF interoperability with llama.cpp (llama-cpp-python from PyPI), both ways.

1. llama.cpp loads the GGUFs our converter writes (f32/q8_0/q4_0, both architectures) and its logits
   match our runtime's. 2. Our runtime loads the GGUFs llama.cpp's own converter writes for the same
   checkpoint and matches llama.cpp. llama.cpp quantizes activations to 8 bits, hence the KL bound.
"""
from __future__ import annotations

import numpy as np
import pytest

import localmoe
from convert import convert

from checkpoints import make_mistral4, make_mixtral
from llamacpp import llama_convert, llama_logits, logit_agreement

N_POS = 96


@pytest.fixture(scope="module", params=["mistral4", "mixtral"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"interop-{request.param}")
    make = make_mistral4 if request.param == "mistral4" else make_mixtral
    # Confident routing: llama.cpp's 8-bit activations must not flip a near-tied top-k choice, which
    # would move one position's logits far more than either side's arithmetic error.
    src, model = make(d / "hf", seed=7, router_std=1.0)
    low = 1000 if request.param == "mistral4" else 3
    ids = [1] + np.random.default_rng(5).integers(low, model.config.vocab_size, N_POS - 1).tolist()
    return request.param, d, src, ids


def check(name, ours, theirs):
    a = logit_agreement(theirs, ours)
    print(f"\n  {name}: rel {a['rel_max_diff']:.2e}, KL {a['mean_kl']:.2e}, top-1 {a['top1_agree']:.1%}")
    assert a["mean_kl"] < 1e-3
    assert a["rel_max_diff"] < 2e-2


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0"])
def test_llamacpp_runs_our_gguf(ckpt, quant):
    arch, d, src, ids = ckpt
    path = d / f"ours-{quant}.gguf"
    convert(src, path, quant)
    check(f"{arch} {quant}: ours vs llama.cpp on our file", localmoe.load(path).logits(ids), llama_logits(path, ids))


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0"])
def test_we_run_llamacpp_gguf(ckpt, quant):
    arch, d, src, ids = ckpt
    # q4_0 through llama_model_quantize with every tensor Q4_0 ("pure"): its default Q4_0 mix stores
    # the output head as Q6_K, a K-quant localmoe does not run yet.
    path = llama_convert(src, d / f"llama-{quant}.gguf", quant, **({"q4_pure": True} if quant == "q4_0" else {}))
    check(f"{arch} {quant}: ours vs llama.cpp on llama.cpp's file", localmoe.load(path).logits(ids),
          llama_logits(path, ids))


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_our_blocks_are_ggmls_blocks(ckpt, quant):
    """Our Q8_0/Q4_0 blocks equal, byte for byte, what ggml's C quantizer (llama_model_quantize, every
    tensor in the type) makes of the same f32 weights — and gguf.quants.quantize of them."""
    import gguf
    from gguf.quants import quantize

    from llamacpp import llama_quantize
    from localmoe.gguf.reader import GGUFFile

    arch, d, src, ids = ckpt
    f32 = d / "ours-f32-for-blocks.gguf"
    convert(src, f32, "f32")
    ours_path = d / f"ours-blocks-{quant}.gguf"
    convert(src, ours_path, quant)
    ggml = GGUFFile(llama_quantize(f32, d / f"ggml-{quant}.gguf", quant, pure=True))
    ours, ref = GGUFFile(ours_path), GGUFFile(f32)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    compared = 0
    for name, ti in ours.tensors.items():
        if ti.type != qtype:
            continue
        assert np.array_equal(np.asarray(ours.raw(name)), quantize(ref.array(name), qtype)), name
        if ggml.tensors[name].type == qtype:
            assert np.array_equal(np.asarray(ours.raw(name)), np.asarray(ggml.raw(name))), name
            compared += 1
    assert compared >= 10
