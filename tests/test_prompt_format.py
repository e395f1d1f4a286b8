"""Prompt formats: `ChatFormat.encode` / `m.chat_tokens` equal mistral-common's encodings of the same
conversations, for every tokenizer version mistral-common ships a file for (and Small 4's v15)."""
from __future__ import annotations

import random
import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import localmoe
from convert import convert
from localmoe.chat import ChatFormat
from localmoe.errors import InputError, ModelFileError
from localmoe.gguf.format import KEY_CHAT_EFFORT_DEFAULT, KEY_CHAT_EFFORTS, KEY_CHAT_FORMAT
from localmoe.gguf.reader import GGUFFile
from localmoe.tokenizer import load_tokenizer

from checkpoints import make_mistral4, make_mixtral
from test_tokenizer import _gguf
from tokenizer_files import MC_DATA, SPM_V1, SPM_V3, TEKKEN_V3, write_tekken_v15

PIECES = ["Hello", "world", "  two  spaces ", "\n", "\n\n", "\t", "Ünïcödé", "日本語", "🎉👩‍💻", "مرحبا", "Привет",
          "[INST]", "</s>", "[THINK]", "{\"reasoning_effort\": \"high\"}", "1234", "  ", " ", "é", "?!", "▁"]
MC_ROLE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 3, 8, 40, 400])            # empty to long
    return "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(n))


def conversation(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": random_text(rng) or "Be brief."}] * rng.randint(0, 1)
    for _ in range(rng.randint(0, 3)):
        msgs.append({"role": "user", "content": random_text(rng)})
        msgs.append({"role": "assistant", "content": random_text(rng) or "ok"})
    return msgs + [{"role": "user", "content": random_text(rng)}]


def reference(mt: MistralTokenizer, msgs: list[dict], effort: str | None) -> list[int]:
    kw = {"reasoning_effort": effort} if effort else {}
    req = ChatCompletionRequest(messages=[MC_ROLE[m["role"]](content=m["content"]) for m in msgs], **kw)
    return mt.encode_chat_completion(req).tokens


def tokenizer_gguf(tmp_path, src, name, vocab_size) -> dict:
    path, _ = _gguf(tmp_path, src, name, vocab_size)
    return GGUFFile(path).metadata


# (tokenizer file, name in the checkpoint, embedding rows, expected format)
FILES = {
    "spm-v1": (SPM_V1, "tokenizer.model", 32000, "mistral-v1"),
    "spm-v2": (MC_DATA / "mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2", 32768, "mistral-v2"),
    "spm-v3": (SPM_V3, "tokenizer.model.v3", 32768, "mistral-v3"),
    "spm-v7": (MC_DATA / "mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7", 32768, "mistral-v7"),
    "tekken-v3": (TEKKEN_V3, "tekken.json", 131072, "mistral-v3"),
    "tekken-v7": (MC_DATA / "tekken_240911.json", "tekken.json", 131072, "mistral-v7"),
}


@pytest.mark.parametrize("kind", FILES)
def test_older_formats_equal_mistral_common(tmp_path, kind):
    src, name, vocab, fmt_name = FILES[kind]
    md = tokenizer_gguf(tmp_path, src, name, vocab)
    assert md[KEY_CHAT_FORMAT] == fmt_name and KEY_CHAT_EFFORTS not in md
    fmt = ChatFormat.from_metadata(md, load_tokenizer(md))
    mt = MistralTokenizer.from_file(str(tmp_path / "src" / name))
    rng = random.Random(kind)
    for _ in range(12):
        msgs = conversation(rng)
        assert fmt.encode(msgs) == reference(mt, msgs, None), msgs
    with pytest.raises(InputError, match="no reasoning effort"):
        fmt.encode([{"role": "user", "content": "hi"}], effort="high")


@pytest.fixture(scope="module")
def v15(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v15")
    tekken = write_tekken_v15(tmp / "tekken.json")
    md = tokenizer_gguf(tmp, tekken, "tekken.json", 131072)
    return ChatFormat.from_metadata(md, load_tokenizer(md)), MistralTokenizer.from_file(str(tekken)), md


def test_v15_metadata_from_the_settings_builder(v15):
    fmt, _, md = v15
    assert (md[KEY_CHAT_FORMAT], list(md[KEY_CHAT_EFFORTS]), md[KEY_CHAT_EFFORT_DEFAULT]) == \
        ("mistral-v15", ["none", "high"], "none")
    assert (fmt.efforts, fmt.default_effort) == (["none", "high"], "none")


def test_v15_equals_mistral_common_on_60_conversations(v15):
    fmt, mt, _ = v15
    rng = random.Random(15)
    for i in range(60):
        msgs = conversation(rng)
        effort = [None, "none", "high"][i % 3]
        assert fmt.encode(msgs, effort) == reference(mt, msgs, effort), (msgs, effort)


def test_v15_layout(v15):
    fmt, _, _ = v15
    tok = fmt.tokenizer
    ids = fmt.encode([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A "}, {"role": "user", "content": "V"}], "high")
    text = "".join(tok.piece(i) for i in ids)
    assert text == ('<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][MODEL_SETTINGS]{"reasoning_effort": "high"}'
                    '[/MODEL_SETTINGS][INST]U[/INST]A</s>[INST]V[/INST]')


def test_bad_efforts_and_messages(v15):
    fmt, _, _ = v15
    user = [{"role": "user", "content": "hi"}]
    for effort in ("medium", "xhigh", "HIGH", ""):
        with pytest.raises(InputError, match="accepts: none, high"):
            fmt.encode(user, effort)
    bad = [[], [{"role": "assistant", "content": "x"}], user + [{"role": "assistant", "content": "x"}],
           user + user, [{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}],
           user + [{"role": "system", "content": "late"}] + user,
           user + [{"role": "assistant", "content": ""}] + user]
    for msgs in bad:
        with pytest.raises(InputError):
            fmt.encode(msgs)


def test_unknown_or_missing_format(v15):
    _, _, md = v15
    tok = load_tokenizer(md)
    with pytest.raises(ModelFileError, match="unknown prompt format"):
        ChatFormat.from_metadata({**md, KEY_CHAT_FORMAT: "chatml"}, tok)
    with pytest.raises(InputError, match="--raw"):
        ChatFormat.from_metadata({k: v for k, v in md.items() if k != KEY_CHAT_FORMAT}, tok)


def test_model_chat_tokens_after_conversion(tmp_path):
    """The converter records the format in real model files; m.chat_tokens equals mistral-common."""
    src, _ = make_mistral4(tmp_path / "s4", layers=1, experts=4, top_k=2)
    write_tekken_v15(src / "tekken.json")
    convert(src, tmp_path / "s4.gguf", "q8_0")
    msrc, _ = make_mixtral(tmp_path / "mx", layers=1, experts=4)
    convert(msrc, tmp_path / "mx.gguf", "q8_0")
    rng = random.Random(4)
    for gguf, ref_file, effort in ((tmp_path / "s4.gguf", src / "tekken.json", "high"),
                                   (tmp_path / "mx.gguf", msrc / "tokenizer.model", None)):
        m = localmoe.load(gguf)
        mt = MistralTokenizer.from_file(str(ref_file))
        for _ in range(3):
            msgs = conversation(rng)
            assert m.chat_tokens(msgs, effort=effort) == reference(mt, msgs, effort)
