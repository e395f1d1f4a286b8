"""Tokenizer files for tests, derived from the ones mistral-common ships (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import mistral_common

MC_DATA = Path(mistral_common.__file__).parent / "data"
TEKKEN_V3 = MC_DATA / "tekken_240718.json"
SPM_V1 = MC_DATA / "tokenizer.model.v1"
SPM_V3 = MC_DATA / "mistral_instruct_tokenizer_240323.model.v3"

# Mistral Small 4's special tokens (mistral-common SpecialTokens; ids of the released v15 file:
# 0-19 as in every tekken file, [ARGS] 32 and [CALL_ID] 33 as since v11, [THINK] 34, [/THINK] 35,
# [MODEL_SETTINGS] 36, [/MODEL_SETTINGS] 37). Slots 20-31 and 38-999 are "<SPECIAL_{id}>".
SMALL4_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]",
    11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 32: "[ARGS]", 33: "[CALL_ID]",
    34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]",
}

# The released file's settings builder: reasoning_effort "none" (default) or "high".
SMALL4_MODEL_SETTINGS_BUILDER = {
    "reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none", "values": ["none", "high"]},
}


def write_tekken_v15(path: Path) -> Path:
    """A v15 tekken.json (Small 4's special tokens and settings builder) over the BPE vocabulary of
    mistral-common's tekken_240718.json (the same vocabulary the v15 file uses). `path` may be a
    directory (the file is then `path/tekken.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tekken.json"
    data = json.loads(TEKKEN_V3.read_text(encoding="utf-8"))
    n_special = data["config"]["default_num_special_tokens"]
    data["config"]["version"] = "v15"
    data["special_tokens"] = [
        {"rank": i, "token_str": SMALL4_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(n_special)
    ]
    data["model_settings_builder"] = SMALL4_MODEL_SETTINGS_BUILDER
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
