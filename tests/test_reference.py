"""Our converter + runtime against Transformers 5.23 on tiny random checkpoints.

f32 must equal the reference; quantized files are judged (a) against Transformers run on exactly
the dequantized weights our converter wrote — this pins the quantized kernels — and (b) by KL
against the f32 reference.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

import localmoe
from convert import convert
from localmoe.gguf.reader import GGUFFile

from checkpoints import hf_greedy, hf_logits, make_mistral4, make_mixtral

N_POS = 256

SHAPES = {
    "mistral4-a": (make_mistral4, dict()),
    "mistral4-b": (make_mistral4, dict(hidden=96, layers=3, heads=3, q_lora=48, kv_lora=64, nope=32, rope=16,
                                       v_dim=32, experts=16, top_k=4, moe_inter=64, first_dense=1, inter=128,
                                       seed=1, max_shard_size="5MB")),
    "mixtral-a": (make_mixtral, dict()),
    "mixtral-b": (make_mixtral, dict(hidden=96, heads=6, kv_heads=2, experts=6, inter=80, layers=3, seed=1,
                                     fused=True)),
}
KL_LIMIT = {"q8_0": 1e-3, "q4_0": 2e-2}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def mean_kl(ref: np.ndarray, ours: np.ndarray) -> float:
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(ours).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def random_ids(model, n: int, seed: int) -> list[int]:
    vocab = model.config.vocab_size
    lo = 1000 if vocab > 100000 else 3          # skip tekken's special-token slots / SPM controls
    return [1] + np.random.default_rng(seed).integers(lo, vocab, n - 1).tolist()


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    make, kw = SHAPES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    src, model = make(d / "hf", **kw)
    ids = random_ids(model, N_POS, seed=len(request.param))
    return dict(name=request.param, src=src, model=model, ids=ids, ref=hf_logits(model, ids), dir=d, files={})


def gguf_for(case, quant: str):
    if quant not in case["files"]:
        out = case["dir"] / f"model-{quant}.gguf"
        convert(case["src"], out, quant)
        case["files"][quant] = out
    return case["files"][quant]


def test_f32_equals_transformers(case):
    m = localmoe.load(gguf_for(case, "f32"))
    ours = m.logits(case["ids"])
    assert ours.shape == case["ref"].shape
    assert rel_diff(ours, case["ref"]) < 1e-4
    prompt = case["ids"][:12]
    assert list(m.generate(prompt, max_tokens=32, stop=())) == hf_greedy(case["model"], prompt, 32)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized(case, quant, capsys):
    path = gguf_for(case, quant)
    ours = localmoe.load(path).logits(case["ids"])
    deq = dequantized_model(case["model"], path)
    ref_deq = hf_logits(deq, case["ids"])
    d = rel_diff(ours, ref_deq)
    kl = mean_kl(case["ref"], ours)
    top1 = float((ours.argmax(-1) == case["ref"].argmax(-1)).mean())
    with capsys.disabled():
        print(f"\n  {case['name']} {quant}: vs dequantized reference {d:.2e}, KL vs f32 {kl:.2e}, top-1 {top1:.1%}")
    assert d < 1e-2
    assert kl < KL_LIMIT[quant]


# -- the GGUF tensors mapped back onto the Transformers model (inverse of the converter's map) ----------

def dequantized_model(model, path):
    f = GGUFFile(path)
    t = {name: torch.from_numpy(np.asarray(dequantize(f.raw(name), ti.type), np.float32).reshape(ti.shape).copy())
         for name, ti in f.tensors.items()}
    sd = (_mistral4_state if f.get("general.architecture") == "mistral4" else _mixtral_state)(t, model.config)
    m = copy.deepcopy(model)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return m


def _common(t, sd):
    sd["model.embed_tokens.weight"] = t["token_embd.weight"]
    sd["model.norm.weight"] = t["output_norm.weight"]
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]


def _mistral4_state(t, cfg):
    sd = {}
    _common(t, sd)
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        for ours, theirs in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                             ("attn_q_a", "self_attn.q_a_proj"), ("attn_q_a_norm", "self_attn.q_a_layernorm"),
                             ("attn_q_b", "self_attn.q_b_proj"), ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
                             ("attn_kv_a_norm", "self_attn.kv_a_layernorm"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate_inp", "mlp.gate"), ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
                             ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
                             ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            if b + ours + ".weight" in t:
                sd[p + theirs + ".weight"] = t[b + ours + ".weight"]
        k_b, v_b = t[b + "attn_k_b.weight"], t[b + "attn_v_b.weight"]
        sd[p + "self_attn.kv_b_proj.weight"] = torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, k_b.shape[1])
        if b + "ffn_gate_exps.weight" in t:
            sd[p + "mlp.experts.gate_up_proj"] = torch.cat([t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]], 1)
            sd[p + "mlp.experts.down_proj"] = t[b + "ffn_down_exps.weight"]
    return sd


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _mixtral_state(t, cfg):
    sd = {}
    _common(t, sd)
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
        sd[p + "self_attn.q_proj.weight"] = _unpermute(t[b + "attn_q.weight"], cfg.num_attention_heads)
        sd[p + "self_attn.k_proj.weight"] = _unpermute(t[b + "attn_k.weight"], cfg.num_key_value_heads)
        sd[p + "self_attn.v_proj.weight"] = t[b + "attn_v.weight"]
        sd[p + "self_attn.o_proj.weight"] = t[b + "attn_output.weight"]
        sd[p + "mlp.gate.weight"] = t[b + "ffn_gate_inp.weight"]
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]], 1)
        sd[p + "mlp.experts.down_proj"] = t[b + "ffn_down_exps.weight"]
    return sd
