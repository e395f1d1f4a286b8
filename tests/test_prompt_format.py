"""Prompt formats: `ChatFormat.encode` / `m.chat_tokens` equal mistral-common's encodings of the same
conversations, for every tokenizer version mistral-common ships a file for (and Small 4's v15)."""
from __future__ import annotations

import json
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

from checkpoints import make_mixtral
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
SPM_FILES = {
    "v1": (SPM_V1, "tokenizer.model", 32000),
    "v2": (MC_DATA / "mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2", 32768),
    "v3": (SPM_V3, "tokenizer.model.v3", 32768),
    "v7": (MC_DATA / "mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7", 32768),
}


def assert_like_mistral_common(fmt: ChatFormat, mt: MistralTokenizer, seed: str, n: int = 12) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        msgs = conversation(rng)
        assert fmt.encode(msgs) == reference(mt, msgs, None), msgs
    with pytest.raises(InputError, match="no reasoning effort"):
        fmt.encode([{"role": "user", "content": "hi"}], effort="high")


@pytest.mark.parametrize("version", SPM_FILES)
def test_sentencepiece_formats_equal_mistral_common(tmp_path, version):
    src, name, vocab = SPM_FILES[version]
    md = tokenizer_gguf(tmp_path, src, name, vocab)
    assert md[KEY_CHAT_FORMAT] == f"mistral-{version}" and KEY_CHAT_EFFORTS not in md
    mt = MistralTokenizer.from_file(str(tmp_path / "src" / name))
    assert_like_mistral_common(ChatFormat.from_metadata(md, load_tokenizer(md)), mt, version)


@pytest.mark.parametrize("version", ["v3", "v7"])
def test_tekken_formats_equal_mistral_common(tmp_path_factory, tekken_v3_md, version):
    """tekken_240718.json is v3; mistral-common ships no tekken file of version 7, so the same
    vocabulary relabelled v7 stands in for it (the format depends only on the version)."""
    tmp = tmp_path_factory.mktemp(f"tekken-{version}")
    data = json.loads(TEKKEN_V3.read_text(encoding="utf-8"))
    data["config"]["version"] = version
    (tmp / "tekken.json").write_text(json.dumps(data), encoding="utf-8")
    md = tekken_v3_md
    assert md[KEY_CHAT_FORMAT] == "mistral-v3" and KEY_CHAT_EFFORTS not in md
    fmt = ChatFormat.from_metadata({**md, KEY_CHAT_FORMAT: f"mistral-{version}"}, load_tokenizer(md))
    assert_like_mistral_common(fmt, MistralTokenizer.from_file(str(tmp / "tekken.json")), version)


@pytest.fixture(scope="module")
def tekken_v3_md(tmp_path_factory) -> dict:
    """The GGUF metadata of tekken_240718.json, written once (writing a tekken vocabulary takes ~10 s)."""
    return tokenizer_gguf(tmp_path_factory.mktemp("tekken"), TEKKEN_V3, "tekken.json", 131072)


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


def test_model_chat_tokens_after_conversion(tmp_path, scripted_gguf):
    """The converter records the format in real model files; m.chat_tokens equals mistral-common."""
    msrc, _ = make_mixtral(tmp_path / "mx", layers=1, experts=4)
    convert(msrc, tmp_path / "mx.gguf", "q8_0")
    rng = random.Random(4)
    for gguf, ref_file, effort in ((scripted_gguf, scripted_gguf.parent / "hf" / "tekken.json", "high"),
                                   (tmp_path / "mx.gguf", msrc / "tokenizer.model", None)):
        m = localmoe.load(gguf)
        mt = MistralTokenizer.from_file(str(ref_file))
        for _ in range(3):
            msgs = conversation(rng)
            assert m.chat_tokens(msgs, effort=effort) == reference(mt, msgs, effort)
