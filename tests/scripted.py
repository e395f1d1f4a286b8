"""A tiny Mistral Small 4-shaped model whose weights make it a bigram machine with a known script.

Every layer's output projections are zero, so the residual stream is the token's embedding; each
script token has its own embedding axis (all other tokens share one "default" axis) and the output
head maps an axis to the token that follows. The real converter and runtime run it unchanged, so
chat tests can check formats, thinking and plumbing against output that is known in advance.

Script: after [/INST] the model thinks ("[THINK]Okay[/THINK]") then answers "Hello world world ..."
(" world" repeats until a limit); after any other token it writes "Done!" then </s>.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from safetensors.numpy import load_file, save_file

from checkpoints import make_mistral4
from tokenizer_files import write_tekken_v15

THINKING, ANSWER_HEAD, ANSWER_LOOP, RAW_ANSWER = "Okay", "Hello", " world", "Done!"
HIDDEN, GAIN = 64, 10.0


def script_ids(tekken: Path) -> dict:
    """token -> the token after it (None: every token not listed), as ids of the tekken file."""
    tok = Tekkenizer.from_file(tekken)
    one = {}
    for text in (THINKING, ANSWER_HEAD, ANSWER_LOOP, "Done", "!"):
        ids = tok.encode(text, bos=False, eos=False)
        assert len(ids) == 1, (text, ids)
        one[text] = ids[0]
    special = tok.get_special_token
    inst, think, end_think, eos = special("[/INST]"), special("[THINK]"), special("[/THINK]"), tok.eos_id
    return {inst: think, think: one[THINKING], one[THINKING]: end_think, end_think: one[ANSWER_HEAD],
            one[ANSWER_HEAD]: one[ANSWER_LOOP], one[ANSWER_LOOP]: one[ANSWER_LOOP],
            None: one["Done"], one["Done"]: one["!"], one["!"]: eos}


def make_scripted(out: Path) -> Path:
    """A checkpoint directory (v15 tekken.json included) of the scripted model."""
    src, _ = make_mistral4(out, hidden=HIDDEN, layers=1, experts=4, top_k=2)
    tekken = write_tekken_v15(src / "tekken.json")
    nxt = script_ids(tekken)
    f = src / "model.safetensors"
    w = load_file(f)
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
            w[name] = np.zeros_like(w[name])
    axis = {t: k for k, t in enumerate(t for t in nxt if t is not None)}
    default_axis = HIDDEN - 1
    embed = np.zeros_like(w["model.embed_tokens.weight"])
    embed[:, default_axis] = 1.0
    head = np.zeros_like(w["lm_head.weight"])
    for t, k in axis.items():
        embed[t] = 0.0
        embed[t, k] = 1.0
    for t, successor in nxt.items():
        head[successor, default_axis if t is None else axis[t]] = GAIN
    w["model.embed_tokens.weight"], w["lm_head.weight"] = embed, head
    w["model.norm.weight"] = np.ones_like(w["model.norm.weight"])
    save_file(w, f, metadata={"format": "pt"})
    return src
