"""llama.cpp itself vs Transformers, on tiny random checkpoints (no localmoe code involved).

These establish that llama.cpp's own converter + runtime reproduce the Transformers reference
for Mixtral (arch ``llama``) and Mistral 4 (arch ``mistral4``), so llama.cpp can serve as a
second reference for our converter/runtime, and they pin the GGUF layout facts recorded in
docs/LLAMACPP.md.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from checkpoints import hf_logits, make_mistral4, make_mixtral  # noqa: E402
from llamacpp import (gguf_summary, gguf_tensor, llama_convert, llama_logits,  # noqa: E402
                      logit_agreement, make_mistral3_wrapper)

N_POS = 80  # >= 64 positions


def _ids(vocab: int, n: int, seed: int, low: int) -> list[int]:
    return np.random.default_rng(seed).integers(low, vocab, n).tolist()


def _report(name, a):
    print(f"\n{name}: max|diff|/max|logit| = {a['rel_max_diff']:.3e}, mean KL = {a['mean_kl']:.3e}, "
          f"top-1 agreement = {a['top1_agree']:.3f}")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    hf_dir, model = make_mixtral(d / "hf")
    gguf = llama_convert(hf_dir, d / "mixtral-f32.gguf", "f32")
    return hf_dir, model, gguf


@pytest.fixture(scope="module")
def mistral4(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral4")
    hf_dir, model = make_mistral4(d / "hf")
    gguf = llama_convert(hf_dir, d / "mistral4-f32.gguf", "f32")
    return hf_dir, model, gguf


@pytest.mark.parametrize("arch,seed,low,how", [("mixtral", 1, 3, "llama.cpp converter"),
                                                ("mistral4", 2, 1000, "llama.cpp converter via driver bypass")])
def test_llamacpp_matches_transformers(request, arch, seed, low, how):
    hf_dir, model, gguf = request.getfixturevalue(arch)
    ids = _ids(model.config.vocab_size, N_POS, seed=seed, low=low)
    a = logit_agreement(hf_logits(model, ids), llama_logits(gguf, ids))
    _report(f"{arch} ({how}, f32)", a)
    assert a["rel_max_diff"] < 1e-4
    assert a["mean_kl"] < 1e-7
    assert a["top1_agree"] == 1.0


def test_mixtral_gguf_layout(mixtral):
    hf_dir, model, gguf = mixtral
    cfg = model.config
    s = gguf_summary(gguf)
    H, E, I, V = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    hd = H // cfg.num_attention_heads
    t, m = s["tensors"], s["metadata"]
    assert s["arch"] == "llama"
    assert t["blk.0.ffn_gate_exps.weight"][:2] == ((E, I, H), (H, I, E))
    assert t["blk.0.ffn_up_exps.weight"][:2] == ((E, I, H), (H, I, E))
    assert t["blk.0.ffn_down_exps.weight"][:2] == ((E, H, I), (I, H, E))
    assert t["blk.0.ffn_gate_inp.weight"][:2] == ((E, H), (H, E))
    assert t["blk.0.attn_k.weight"][0] == (cfg.num_key_value_heads * hd, H)
    assert t["token_embd.weight"][0] == (V, H) and t["output.weight"][0] == (V, H)
    assert m["llama.expert_count"] == E and m["llama.expert_used_count"] == cfg.num_experts_per_tok
    assert m["llama.rope.dimension_count"] == hd
    assert m["tokenizer.ggml.model"] == "llama"

    # attn_q / attn_k rows are permuted from HF's rotate-half layout to llama.cpp's interleaved
    # (NORM) RoPE layout: per head, new row 2*i + j  <-  old row j*(hd/2) + i.
    wk = gguf_tensor(gguf, "blk.0.attn_k.weight")
    hf_k = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    nkv = cfg.num_key_value_heads
    perm = hf_k.reshape(nkv, 2, hd // 2, H).swapaxes(1, 2).reshape(hf_k.shape)
    np.testing.assert_array_equal(wk, perm)


def test_mistral4_gguf_layout(mistral4):
    hf_dir, model, gguf = mistral4
    c = model.config
    s = gguf_summary(gguf)
    t, m = s["tensors"], s["metadata"]
    H, V, nh = c.hidden_size, c.vocab_size, c.num_attention_heads
    E, I = c.n_routed_experts, c.moe_intermediate_size
    nope, rope, vd, kvl, ql = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank
    assert s["arch"] == "mistral4"
    expect = {
        "token_embd.weight": (V, H), "output.weight": (V, H), "output_norm.weight": (H,),
        "blk.0.attn_norm.weight": (H,), "blk.0.ffn_norm.weight": (H,),
        "blk.0.attn_q_a.weight": (ql, H), "blk.0.attn_q_a_norm.weight": (ql,),
        "blk.0.attn_q_b.weight": (nh * (nope + rope), ql),
        "blk.0.attn_kv_a_mqa.weight": (kvl + rope, H), "blk.0.attn_kv_a_norm.weight": (kvl,),
        "blk.0.attn_k_b.weight": (nh, kvl, nope), "blk.0.attn_v_b.weight": (nh, vd, kvl),
        "blk.0.attn_output.weight": (H, nh * vd),
        "blk.0.ffn_gate_inp.weight": (E, H),
        "blk.0.ffn_gate_up_exps.weight": (E, 2 * I, H), "blk.0.ffn_down_exps.weight": (E, H, I),
        "blk.0.ffn_gate_shexp.weight": (I, H), "blk.0.ffn_up_shexp.weight": (I, H),
        "blk.0.ffn_down_shexp.weight": (H, I),
    }
    for name, shape in expect.items():
        assert t[name][0] == shape, (name, t[name])
        assert t[name][2] == "F32"
    a = "mistral4."
    assert m[a + "attention.head_count_kv"] == 1
    assert m[a + "attention.key_length"] == kvl + rope and m[a + "attention.value_length"] == kvl
    assert m[a + "attention.key_length_mla"] == nope + rope and m[a + "attention.value_length_mla"] == vd
    assert m[a + "rope.dimension_count"] == rope
    assert m[a + "rope.scaling.type"] == "yarn" and m[a + "rope.scaling.factor"] == 128.0
    assert math.isclose(m[a + "rope.scaling.yarn_log_multiplier"], 0.1, rel_tol=1e-6)
    assert m[a + "expert_weights_norm"] is True and m[a + "expert_weights_scale"] == 1.0
    assert a + "expert_gating_func" not in m  # runtime default: softmax
    assert a + "attention.temperature_scale" not in m  # HF path drops the llama-4 query scaling
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "tekken"

    # attn_k_b = kv_b_proj's per-head k rows, transposed; attn_v_b = its v rows (no RoPE permutation)
    kvb = model.model.layers[0].self_attn.kv_b_proj.weight.detach().numpy().reshape(nh, nope + vd, kvl)
    np.testing.assert_array_equal(gguf_tensor(gguf, "blk.0.attn_k_b.weight"), kvb[:, :nope].transpose(0, 2, 1))
    np.testing.assert_array_equal(gguf_tensor(gguf, "blk.0.attn_v_b.weight"), kvb[:, nope:])
    gu = model.model.layers[0].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(gguf_tensor(gguf, "blk.0.ffn_gate_up_exps.weight"), gu)


def test_mistral4_via_mistral3_wrapper(mistral4, tmp_path):
    """The real Small 4 layout (Mistral3ForConditionalGeneration, language_model.* names) goes
    through llama.cpp's registered path; only the vocabulary bypass is needed. Same tensors."""
    hf_dir, model, gguf = mistral4
    w = make_mistral3_wrapper(hf_dir, tmp_path / "wrapped")
    g2 = llama_convert(w, tmp_path / "wrapped-f32.gguf", "f32")
    s1, s2 = gguf_summary(gguf), gguf_summary(g2)
    assert s2["arch"] == "mistral4"
    assert s1["tensors"] == s2["tensors"]
    ids = _ids(model.config.vocab_size, 16, seed=3, low=1000)
    np.testing.assert_array_equal(llama_logits(gguf, ids), llama_logits(g2, ids))


@pytest.mark.parametrize("arch,outtype,max_kl", [("mixtral", "q8_0", 1e-4), ("mixtral", "q4_0", 3e-3),
                                                  ("mistral4", "q4_0", 3e-3)])
def test_llamacpp_quantized_outtypes(arch, outtype, max_kl, mixtral, mistral4, tmp_path):
    """q8_0 from llama.cpp's converter; q4_0 = converter f16 -> llama_model_quantize (llama.cpp's
    own mixed choices: tensors whose rows are not a multiple of 32 fall back, output.weight
    becomes Q8_0 here because 64 is not a multiple of Q6_K's 256). Loose bounds: it runs and
    stays close."""
    hf_dir, model, _ = mixtral if arch == "mixtral" else mistral4
    g = llama_convert(hf_dir, tmp_path / f"{arch}-{outtype}.gguf", outtype)
    types = {v[2] for v in gguf_summary(g)["tensors"].values()}
    assert outtype.upper() in types
    low = 3 if arch == "mixtral" else 1000
    ids = _ids(model.config.vocab_size, 64, seed=4, low=low)
    a = logit_agreement(hf_logits(model, ids), llama_logits(g, ids))
    _report(f"{arch} {outtype}", a)
    assert a["mean_kl"] < max_kl
