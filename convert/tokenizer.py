"""Tokenizer files of a checkpoint -> GGUF tokenizer metadata in llama.cpp's layout.

- `tekken.json` (Mistral's tiktoken-style byte-level BPE) is written the way llama.cpp's converter
  writes it: model "gpt2", pre "tekken", the special tokens first (CONTROL), then every regular token
  as its GPT-2 byte-to-unicode string in rank order, merges derived from the ranks.
- `tokenizer.model` (SentencePiece) is written as model "llama" with pieces, scores and types.
- `tokenizer.json` (Hugging Face fast tokenizer, BPE): SentencePiece-derived files (byte fallback,
  "▁" for spaces) as "llama", byte-level ones as "gpt2".

Besides llama.cpp's keys we write `localmoe.tokenizer.version` (tekken's config.version, "spm" for
SentencePiece) and, for byte-level BPE, `localmoe.tokenizer.pattern` (the pre-tokenizer regex).
Mistral tokenizer files also give the prompt format (`localmoe.chat.format`: "mistral-" + the
mistral-common version, from tekken's config.version or the SentencePiece file name as mistral-common
reads it) and the reasoning efforts the model accepts (tekken's `model_settings_builder`).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import gguf

from localmoe.errors import ConvertError
from localmoe.gguf.format import (KEY_CHAT_EFFORT_DEFAULT, KEY_CHAT_EFFORTS, KEY_CHAT_FORMAT,
                                  KEY_TOKENIZER_PATTERN, KEY_TOKENIZER_VERSION)
from localmoe.tokenizer import TEKKEN_PATTERN, bytes_to_unicode

T = gguf.TokenType

# Special tokens of tekken files that predate the in-file "special_tokens" list (mistral-common's
# Tekkenizer.DEPRECATED_SPECIAL_TOKENS); the remaining slots are "<SPECIAL_{id}>".
TEKKEN_DEPRECATED_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)


_BYTE_TO_CHAR = bytes_to_unicode()
_LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in _BYTE_TO_CHAR.items()})


def byte_token_string(b: bytes) -> str:
    return b.decode("latin-1").translate(_LATIN1_TO_GPT2)


def find_tokenizer(src_dir: Path) -> Path | None:
    """The tokenizer file we convert: tekken.json first (mistral-common is the reference), then a
    SentencePiece model, then tokenizer.json."""
    src_dir = Path(src_dir)
    for name in ("tekken.json", "tokenizer.model"):
        if (src_dir / name).is_file():
            return src_dir / name
    versioned = sorted(src_dir.glob("tokenizer.model.v*"), key=lambda p: _version_key(p.suffix[2:]))
    if versioned:
        return versioned[-1]
    if (src_dir / "tokenizer.json").is_file():
        return src_dir / "tokenizer.json"
    return None


def _version_key(s: str):
    m = re.match(r"(\d+)(.*)", s)
    return (int(m.group(1)), m.group(2)) if m else (-1, s)


def write_tokenizer(writer: gguf.GGUFWriter, src_dir: Path, vocab_size: int) -> str:
    """Add the tokenizer of checkpoint directory `src_dir` to `writer`, padded/truncated to the
    model's `vocab_size` (embedding rows). Returns the kind: "tekken", "spm", "hf-spm" or "hf-bpe"."""
    path = find_tokenizer(Path(src_dir))
    if path is None:
        raise ConvertError(f"{src_dir}: no tokenizer file (tekken.json, tokenizer.model or tokenizer.json)")
    try:
        if path.name == "tekken.json":
            return _write_tekken(writer, path, vocab_size)
        if path.name.startswith("tokenizer.model"):
            return _write_spm(writer, path, vocab_size)
        return _write_hf(writer, path, vocab_size)
    except ConvertError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read tokenizer: {e}") from e


# -- tekken ------------------------------------------------------------------------------------------
def _write_tekken(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> str:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    cfg = data["config"]
    version = cfg.get("version")
    if not version:
        raise ConvertError(f"{path}: tekken config has no version")
    n_special = int(cfg["default_num_special_tokens"])

    specials = [f"<SPECIAL_{i}>" for i in range(n_special)]
    listed = data.get("special_tokens")
    if listed is None:
        listed = [{"rank": i, "token_str": s} for i, s in enumerate(TEKKEN_DEPRECATED_SPECIALS)]
    for t in listed:
        if not 0 <= t["rank"] < n_special:
            raise ConvertError(f"{path}: special token {t['token_str']!r} has rank {t['rank']} >= {n_special}")
        specials[t["rank"]] = t["token_str"]
    if len(set(specials)) != n_special:
        raise ConvertError(f"{path}: duplicate special tokens")

    # mistral-common keeps the first default_vocab_size - n_special regular tokens; a smaller model
    # vocabulary cuts further (as Tekkenizer(vocab_size=...) does), a larger one is padded.
    n_regular = min(int(cfg["default_vocab_size"]), vocab_size) - n_special
    if n_regular < 256:
        raise ConvertError(f"{path}: model vocab_size {vocab_size} leaves fewer than 256 regular tokens "
                           f"after {n_special} special tokens")
    vocab = data["vocab"]
    if len(vocab) < n_regular:
        raise ConvertError(f"{path}: {len(vocab)} regular tokens, config needs {n_regular}")
    ranks: dict[bytes, int] = {}
    for i, t in enumerate(vocab[:n_regular]):
        if t["rank"] != i:
            raise ConvertError(f"{path}: vocab entry {i} has rank {t['rank']}")
        ranks[base64.b64decode(t["token_bytes"])] = i
    if len(ranks) != n_regular:
        raise ConvertError(f"{path}: duplicate regular tokens")
    by_rank = list(ranks)

    strs = [byte_token_string(b) for b in by_rank]
    tokens = specials + strs
    types = [T.CONTROL] * n_special + [T.NORMAL] * n_regular
    _pad(tokens, types, vocab_size)

    def special(name: str, default: int | None = None) -> int | None:
        return specials.index(name) if name in specials else default

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_token_merges(_merges_from_ranks(ranks, by_rank, strs, path))
    bos, eos = special("<s>"), special("</s>")
    if bos is None or eos is None:
        raise ConvertError(f"{path}: no <s> or </s> special token")
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if (unk := special("<unk>")) is not None:
        writer.add_unk_token_id(unk)
    writer.add_pad_token_id(special("<pad>", eos))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_string(KEY_TOKENIZER_VERSION, version)
    writer.add_string(KEY_TOKENIZER_PATTERN, cfg.get("pattern") or TEKKEN_PATTERN)
    _write_chat_format(writer, version, data.get("model_settings_builder"))
    return "tekken"


def spm_version(path: Path) -> str:
    """mistral-common's version of a SentencePiece file, from its name: "tokenizer.model.v3" -> "v3",
    "...model.v7m1" -> "v7", a bare "tokenizer.model" -> "v1"."""
    suffix = Path(path).name.split(".")[-1]
    return "v1" if suffix == "model" else suffix.split("m")[0]


def _write_chat_format(writer: gguf.GGUFWriter, version: str, settings_builder: dict | None) -> None:
    """The prompt format and the reasoning efforts the model's settings builder accepts."""
    writer.add_string(KEY_CHAT_FORMAT, f"mistral-{version}")
    effort = (settings_builder or {}).get("reasoning_effort")
    if not effort:
        return
    if effort.get("type") != "enum" or not effort.get("values"):
        raise ConvertError(f"unsupported reasoning_effort settings builder: {effort}")
    writer.add_array(KEY_CHAT_EFFORTS, [str(v) for v in effort["values"]])
    if effort.get("default") is not None:
        writer.add_string(KEY_CHAT_EFFORT_DEFAULT, str(effort["default"]))


def _merges_from_ranks(ranks: dict[bytes, int], by_rank: list[bytes], strs: list[str], path: Path) -> list[str]:
    """BPE merges from tiktoken ranks exactly as llama.cpp's MistralVocab derives them: for each token
    of rank >= 256 in rank order, every split into two known tokens, ordered by (left, right) rank."""
    merges: list[str] = []
    for i in range(256, len(by_rank)):
        tok = by_rank[i]
        local = [(ranks[tok[:j]], ranks[tok[j:]]) for j in range(1, len(tok))
                 if tok[:j] in ranks and tok[j:] in ranks]
        if not local:
            raise ConvertError(f"{path}: no merge produces the token of rank {i}")
        local.sort()
        merges.extend(f"{strs[a]} {strs[b]}" for a, b in local)
    return merges


def _pad(tokens: list, types: list, vocab_size: int, scores: list | None = None, score: float = -1000.0) -> None:
    """Unused "[PAD{id}]" tokens up to the embedding rows, as llama.cpp's converter pads."""
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(score)


# -- SentencePiece -----------------------------------------------------------------------------------
def _write_spm(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> str:
    model = read_spm_model(path)
    n = len(model["pieces"])
    if model["model_type"] != 2:
        raise ConvertError(f"{path}: only BPE SentencePiece models are supported (model_type {model['model_type']})")
    if model["charsmap"]:
        raise ConvertError(f"{path}: SentencePiece normaliser {model['normalizer']!r} is not supported (only identity)")
    if vocab_size < n:
        raise ConvertError(f"{path}: tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    tokens = [p for p, _, _ in model["pieces"]]
    scores = [s for _, s, _ in model["pieces"]]
    # SentencePiece's piece types have GGUF's numbering (NORMAL 1 ... BYTE 6). llama.cpp's converter
    # writes user-defined pieces as NORMAL; we keep USER_DEFINED so they match whole, as sentencepiece
    # matches them (llama.cpp's runtime also splits USER_DEFINED tokens out first).
    types = [t for _, _, t in model["pieces"]]
    _pad(tokens, types, vocab_size, scores, -10000.0)
    bos, eos, unk, pad = model["bos_id"], model["eos_id"], model["unk_id"], model["pad_id"]

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if bos >= 0:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    writer.add_pad_token_id(pad if pad >= 0 else eos)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(model["add_dummy_prefix"])
    writer.add_remove_extra_whitespaces(model["remove_extra_whitespaces"])
    writer.add_string(KEY_TOKENIZER_VERSION, "spm")
    _write_chat_format(writer, spm_version(path), None)
    return "spm"


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            n = varint()
            yield field, wire, buf[pos:pos + n]
            pos += n
        elif wire == 5:
            yield field, wire, buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_spm_model(path: Path) -> dict:
    """The parts of a SentencePiece ModelProto we need, parsed without protobuf: pieces as
    (text, score, type), the trainer's special ids and model type, the normaliser's options."""
    import struct

    buf = Path(path).read_bytes()
    out = {"pieces": [], "model_type": 1, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
           "normalizer": "", "charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True}

    def signed(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v

    for field, wire, value in _proto_fields(buf):
        if field == 1 and wire == 2:  # SentencePiece
            piece, score, typ = "", 0.0, 1
            for f, w, v in _proto_fields(value):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    (score,) = struct.unpack("<f", v)
                elif f == 3 and w == 0:
                    typ = v
            out["pieces"].append((piece, score, typ))
        elif field == 2 and wire == 2:  # TrainerSpec
            for f, w, v in _proto_fields(value):
                if w == 0 and f in (3, 40, 41, 42, 43):
                    out[{3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[f]] = signed(v)
        elif field == 3 and wire == 2:  # NormalizerSpec
            for f, w, v in _proto_fields(value):
                if f == 1 and w == 2:
                    out["normalizer"] = v.decode("utf-8")
                elif f == 2 and w == 2:
                    out["charsmap"] = bytes(v)
                elif f == 3 and w == 0:
                    out["add_dummy_prefix"] = bool(v)
                elif f == 4 and w == 0:
                    out["remove_extra_whitespaces"] = bool(v)
    if not out["pieces"]:
        raise ValueError("not a SentencePiece model (no pieces)")
    return out


# -- Hugging Face tokenizer.json ---------------------------------------------------------------------
def _write_hf(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> str:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: only BPE tokenizer.json files are supported, not {model.get('type')!r}")
    cfg_path = path.with_name("tokenizer_config.json")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    n = max([*vocab.values(), *added, -1]) + 1
    if n > vocab_size:
        raise ConvertError(f"{path}: tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    tokens: list[str | None] = [None] * n
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    spm_like = bool(model.get("byte_fallback")) or "▁" in json.dumps(data.get("decoder"))

    types = [T.NORMAL] * n
    scores = [0.0] * n
    if spm_like:
        # Scores that make SentencePiece's "best score first" equal to the BPE merge order.
        for k, m in enumerate(merges):
            i = vocab.get(m.replace(" ", "", 1) if " " in m else m)
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(k + 1)
        for i, t in enumerate(tokens):  # pieces no merge produces must come after every merge
            if t is not None and len(t) > 1 and scores[i] == 0.0:
                scores[i] = -1e9
        for i, t in enumerate(tokens):
            if t is not None and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                types[i] = T.BYTE
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = T.UNKNOWN
    for i, t in added.items():
        tokens[i] = t["content"]
        if types[i] == T.NORMAL:
            types[i] = T.CONTROL if t.get("special") else T.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", T.UNUSED
    tokens = list(tokens)
    _pad(tokens, types, vocab_size, scores)

    def tok_id(key: str, default: str) -> int | None:
        v = cfg.get(key, default)
        if isinstance(v, dict):
            v = v.get("content")
        return tokens.index(v) if v in tokens else None

    if spm_like:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        dump = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
        writer.add_add_space_prefix('"Prepend"' in dump or '"prepend_scheme": "first"' in dump
                                    or '"prepend_scheme": "always"' in dump or '"add_prefix_space": true' in dump)
    else:
        pattern = _hf_split_pattern(data.get("pre_tokenizer"))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("tekken" if pattern == TEKKEN_PATTERN else "default")
        writer.add_token_merges(merges)
        if pattern:
            writer.add_string(KEY_TOKENIZER_PATTERN, pattern)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, default, add in (("bos_token", "<s>", writer.add_bos_token_id),
                              ("eos_token", "</s>", writer.add_eos_token_id),
                              ("unk_token", "<unk>", writer.add_unk_token_id),
                              ("pad_token", "<pad>", writer.add_pad_token_id)):
        if (i := tok_id(key, default)) is not None:
            add(i)
    writer.add_add_bos_token(bool(cfg.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(cfg.get("add_eos_token", False)))
    writer.add_string(KEY_TOKENIZER_VERSION, "spm" if spm_like else "bpe")
    return "hf-spm" if spm_like else "hf-bpe"


def _hf_split_pattern(pre) -> str | None:
    """The regex of a byte-level pre-tokenizer's Split step, if any."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            if (r := _hf_split_pattern(p)) is not None:
                return r
        return None
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return pat.get("Regex") if "Regex" in pat else re.escape(pat.get("String", ""))
    return None
