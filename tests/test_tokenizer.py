"""Tokenizer: tokenizer files -> GGUF metadata (convert/tokenizer.py) -> runtime tokenizer
(localmoe/tokenizer.py), compared with the references: mistral-common's Tekkenizer and sentencepiece."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from convert.tokenizer import write_tokenizer
from localmoe.errors import ConvertError, ModelFileError
from localmoe.gguf.format import KEY_TOKENIZER_VERSION
from localmoe.gguf.reader import GGUFFile
from localmoe.tokenizer import load_tokenizer

from tokenizer_files import SMALL4_SPECIALS, SPM_V1, SPM_V3, TEKKEN_V3, write_tekken_v15

TEXT = (
    "Hello, world! The quick brown fox jumps over the lazy dog.\n"
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n"
    "\tindented\t\ttabs   and    spaces     \r\n"
    "Ünïcödé: función común días — «guillemets» façade naïve Straße ÆØÅ\n"
    "日本語のテキスト、中文文本。한국어 텍스트 🎉🚀👩‍💻 ∑∫√∞ ≠ ≤\n"
    "مرحبا بالعالم — Привет, мир! Γειά σου Κόσμε שלום עולם\n"
    "[INST] literal specials [/INST] <s> </s> <unk> [THINK]x[/THINK] [MODEL_SETTINGS] [REFERENCE_DOC_1] ▁▁\n"
    "numbers 1234567890 3.14159 1e-9 0xFF  trailing   "
)

# Text strategy: any Unicode except lone surrogates (not encodable), biased toward whitespace,
# special-token strings and scripts that stress the pre-tokenizer.
_FRAGMENTS = st.sampled_from([
    " ", "  ", "\n", "\t", "\r\n", "[INST]", "</s>", "<s>", "[THINK]", "▁", "é", "日本", "🎉", "👩‍💻",
    "مرحبا", "'s", "123", "...", "[REFERENCE_DOC_1]", "<0x41>", "\x00",
])
TEXTS = st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=12) | _FRAGMENTS,
                 max_size=12).map("".join)
HYP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gguf(tmp: Path, src_file: Path, name: str, vocab_size: int) -> tuple[Path, str]:
    """Convert one tokenizer file (copied into a checkpoint-like directory) into a tiny GGUF."""
    src = tmp / "src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(src_file, src / name)
    out = tmp / "tok.gguf"
    w = gguf.GGUFWriter(out, "llama")
    kind = write_tokenizer(w, src, vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out, kind


_PATHS: dict[int, Path] = {}  # id(tokenizer) -> the GGUF file it was loaded from


def _load(path: Path):
    f = GGUFFile(path)
    md = dict(f.metadata)
    f.close()
    return md, load_tokenizer(md)


# -- fixtures (module scope: converting a tekken vocabulary takes a few seconds) ----------------------
@pytest.fixture(scope="module")
def tekken_v15(tmp_path_factory):
    """Small 4's v15 tekken for a model with 16 more embedding rows than tokens (padded)."""
    tmp = tmp_path_factory.mktemp("tekken_v15")
    src = write_tekken_v15(tmp / "tekken_v15.json")
    path, kind = _gguf(tmp, src, "tekken.json", 131072 + 16)
    assert kind == "tekken"
    md, tok = _load(path)
    _PATHS[id(tok)] = path
    return md, tok, Tekkenizer.from_file(src)


@pytest.fixture(scope="module", params=["v1", "v3"])
def spm(request, tmp_path_factory):
    src = {"v1": SPM_V1, "v3": SPM_V3}[request.param]
    ref = sentencepiece.SentencePieceProcessor(model_file=str(src))
    path, kind = _gguf(tmp_path_factory.mktemp(f"spm_{request.param}"), src, "tokenizer.model", ref.vocab_size())
    assert kind == "spm"
    md, tok = _load(path)
    _PATHS[id(tok)] = path
    return md, tok, ref


# -- tekken ---------------------------------------------------------------------------------------------
def test_tekken_metadata_in_llama_cpp_layout(tekken_v15):
    md, tok, ref = tekken_v15
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "tekken"
    assert md[KEY_TOKENIZER_VERSION] == "v15"
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 131088
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "[INST]"] and tokens[999] == "<SPECIAL_999>"
    assert (types[:1000] == gguf.TokenType.CONTROL).all() and (types[1000:131072] == gguf.TokenType.NORMAL).all()
    assert tokens[1000] == "Ā" and tokens[1000 + 32] == "Ġ"   # bytes 0 and 0x20, GPT-2 alphabet
    assert md["tokenizer.ggml.merges"][0] == "Ġ Ġ" or " " in md["tokenizer.ggml.merges"][0]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"], md["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 11)
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert (tok.kind, tok.version, tok.vocab_size, tok.bos_id, tok.eos_id) == ("tekken", "v15", 131088, 1, 2)


def test_tekken_known_ids(tekken_v15):
    _, tok, _ = tekken_v15
    assert tok.encode("Hello, world!") == [1, 22177, 1044, 4304, 1033]
    assert tok.encode("función común días 日本語 🎉") == [1, 12127, 1963, 35239, 20608, 30367, 15199, 119685, 1142, 1137]


def test_tekken_matches_mistral_common(tekken_v15):
    _, tok, ref = tekken_v15
    for bos, eos in ((True, False), (False, False), (True, True)):
        assert tok.encode(TEXT, bos=bos, eos=eos) == ref.encode(TEXT, bos, eos)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == ref.decode(ids) == TEXT
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode()
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.token_bytes(1) == b"" and tok.piece(3) == "[INST]" and tok.piece(22177) == ref.id_to_piece(22177)
    assert tok.decode([1, 22177, 3, 1044, 4304, 2]) == ref.decode([1, 22177, 3, 1044, 4304, 2]) == "Hello, world"


def test_tekken_v15_special_ids(tekken_v15):
    _, tok, ref = tekken_v15
    assert ref.version == TokenizerVersion.v15 and ref.model_settings_builder is not None
    for i, name in SMALL4_SPECIALS.items():
        assert tok.special_id(name) == ref.get_special_token(name) == i
    assert [tok.special_id(n) for n in ("[THINK]", "[/THINK]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]")] == [34, 35, 36, 37]
    with pytest.raises(ModelFileError):
        tok.special_id("[NOT_A_TOKEN]")


@HYP
@given(text=TEXTS)
def test_tekken_random_text(tekken_v15, text):
    _, tok, ref = tekken_v15
    ids = tok.encode(text, bos=True, eos=False)
    assert ids == ref.encode(text, True, False)
    assert tok.decode(ids) == text


@HYP
@given(ids=st.lists(st.integers(0, 131071) | st.integers(0, 40) | st.integers(1000, 1300), max_size=30))
def test_tekken_decode_random_ids(tekken_v15, ids):
    _, tok, ref = tekken_v15
    assert tok.decode(ids) == ref.decode(ids)
    for i in ids[:5]:
        assert tok.token_bytes(i) == ref.id_to_byte_piece(i)
        assert tok.piece(i) == ref.id_to_piece(i)


def test_tekken_vocab_padding_and_truncation(tekken_v15, tmp_path):
    md, tok, ref = tekken_v15
    assert tok.vocab_size == 131088 and md["tokenizer.ggml.tokens"][-1] == "[PAD131087]"
    assert (md["tokenizer.ggml.token_type"][-16:] == gguf.TokenType.UNUSED).all()
    assert tok.encode(TEXT) == ref.encode(TEXT, True, False)
    assert tok.decode([131080, 22177]) == "Hello" and tok.token_bytes(131080) == b""

    # A smaller model vocabulary keeps the lowest ranks, as Tekkenizer(vocab_size=...) does.
    path, _ = _gguf(tmp_path / "cut", TEKKEN_V3, "tekken.json", 3000)
    _, small = _load(path)
    data = json.loads(TEKKEN_V3.read_text())
    ref = Tekkenizer(data["vocab"], list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS), data["config"]["pattern"],
                     vocab_size=3000, num_special_tokens=1000, version=TokenizerVersion.v3)
    assert small.vocab_size == 3000 and small.version == "v3"
    assert small.special_id("[INST]") == 3 and small.special_id("[TOOL_CONTENT]") == 19   # pre-"special_tokens" file
    assert small.piece(20) == "<SPECIAL_20>"
    assert small.encode(TEXT) == ref.encode(TEXT, True, False)
    assert small.decode(small.encode(TEXT)) == TEXT


# -- SentencePiece ------------------------------------------------------------------------------------
def test_spm_metadata(spm):
    md, tok, ref = spm
    assert md["tokenizer.ggml.model"] == "llama" and md[KEY_TOKENIZER_VERSION] == "spm"
    assert md["tokenizer.ggml.tokens"] == [ref.id_to_piece(i) for i in range(ref.vocab_size())]
    assert np.array_equal(md["tokenizer.ggml.scores"], np.array([ref.get_score(i) for i in range(ref.vocab_size())], np.float32))
    types = md["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert md["tokenizer.ggml.tokens"][3 + 256] == "<0xFF>" or (types == gguf.TokenType.BYTE).sum() == 256
    assert (tok.kind, tok.version, tok.bos_id, tok.eos_id, tok.vocab_size) == ("spm", "spm", 1, 2, ref.vocab_size())
    assert tok.special_id("</s>") == 2


def test_spm_matches_sentencepiece(spm):
    _, tok, ref = spm
    ids = tok.encode(TEXT, bos=False)
    assert ids == ref.encode(TEXT)
    assert tok.encode(TEXT) == [1] + ids and tok.encode(TEXT, eos=True)[-1] == 2
    assert tok.decode(ids) == ref.decode(ids) == TEXT.replace("▁", " ")  # "▁" is a space to SentencePiece
    for s in ("", " ", "  x", "\n", "a  b", "[INST]", "🎉", "x" * 300, " \u2581 "):
        assert tok.encode(s, bos=False) == ref.encode(s), s
    assert tok.piece(1) == "<s>" and tok.token_bytes(1) == b""


@HYP
@given(text=TEXTS)
def test_spm_random_text(spm, text):
    _, tok, ref = spm
    ids = tok.encode(text, bos=False)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids)
    if "\x00" not in text and "▁" not in text:
        assert tok.decode(ids) == text


@HYP
@given(data=st.data())
def test_spm_decode_random_ids(spm, data):
    """Any id sequence (bytes forming invalid UTF-8, controls, <unk>) decodes as sentencepiece does."""
    _, tok, ref = spm
    byte0 = ref.piece_to_id("<0x00>")
    ids = data.draw(st.lists(st.integers(0, ref.vocab_size() - 1) | st.integers(0, 40)
                             | st.integers(byte0, byte0 + 255), max_size=12))
    assert tok.decode(ids) == ref.decode(ids)


def test_spm_vocab_padding(tmp_path):
    path, _ = _gguf(tmp_path, SPM_V1, "tokenizer.model", 32016)
    md, tok = _load(path)
    assert tok.vocab_size == 32016 and md["tokenizer.ggml.tokens"][-1] == "[PAD32015]"
    assert tok.encode(TEXT, bos=False) == sentencepiece.SentencePieceProcessor(model_file=str(SPM_V1)).encode(TEXT)
    with pytest.raises(ConvertError):
        _gguf(tmp_path / "small", SPM_V1, "tokenizer.model", 1000)


# -- llama.cpp reads the same files and tokenizes the same ----------------------------------------------
def test_llama_cpp_tokenizes_like_us(tekken_v15, spm):
    llama_cpp = pytest.importorskip("llama_cpp")
    # Left out: a literal "▁" (SentencePiece reads it as a space) and a user-defined piece (llama.cpp
    # splits text around it differently from sentencepiece, e.g. "[REFERENCE_DOC_1]x" in v3).
    text = TEXT.replace("▁", "").replace("[REFERENCE_DOC_1]", "")
    for _, tok, _ in (tekken_v15, spm):
        llm = llama_cpp.Llama(model_path=str(_PATHS[id(tok)]), vocab_only=True, verbose=False)
        assert llm.n_vocab() == tok.vocab_size
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text), tok.kind
        ids = tok.encode(text, bos=False)
        assert llm.detokenize(ids).decode() == (text if tok.kind == "tekken" else " " + text)


# -- files and errors ---------------------------------------------------------------------------------
def test_no_tokenizer_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    with pytest.raises(ConvertError, match="no tokenizer"):
        write_tokenizer(w, tmp_path, 32000)


def test_corrupt_tokenizer_raises_convert_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(ConvertError):
        write_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path, 32000)


def test_no_tokenizer_metadata_raises():
    with pytest.raises(ModelFileError):
        load_tokenizer({"general.architecture": "llama"})


def test_written_file_loads_from_disk(tmp_path):
    """The whole path once more, from a file written by write_tokenizer: tekken preferred over
    tokenizer.json / tokenizer.model when a directory has several (as llama.cpp does)."""
    src = tmp_path / "ckpt"
    src.mkdir()
    write_tekken_v15(src)
    shutil.copy(SPM_V1, src / "tokenizer.model")
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "mistral4")
    assert write_tokenizer(w, src, 2000) == "tekken"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(GGUFFile(tmp_path / "m.gguf").metadata)
    assert tok.kind == "tekken" and tok.version == "v15" and tok.special_id("[THINK]") == 34
    assert tok.decode(tok.encode("Bonjour 🎉")) == "Bonjour 🎉"


# -- Hugging Face tokenizer.json ------------------------------------------------------------------------
def _tekken_as_tokenizer_json(path: Path) -> None:
    """A byte-level BPE tokenizer.json equal to tekken (what Mistral ships next to tekken.json)."""
    from convert.tokenizer import TEKKEN_PATTERN, byte_token_string
    import base64

    data = json.loads(TEKKEN_V3.read_text())
    n_reg = 3000 - 1000
    regs = [base64.b64decode(t["token_bytes"]) for t in data["vocab"][:n_reg]]
    ranks = {b: i for i, b in enumerate(regs)}
    vocab = {f"<SPECIAL_{i}>": i for i in range(1000)}
    vocab.update({byte_token_string(b): i + 1000 for i, b in enumerate(regs)})
    merges = []
    for i in range(256, n_reg):
        b = regs[i]
        split = min((ranks[b[:j]], ranks[b[j:]]) for j in range(1, len(b)) if b[:j] in ranks and b[j:] in ranks)
        merges.append([byte_token_string(regs[split[0]]), byte_token_string(regs[split[1]])])
    specials = dict(enumerate(Tekkenizer.DEPRECATED_SPECIAL_TOKENS))
    added = [{"id": i, "content": specials[i]["token_str"] if i in specials else f"<SPECIAL_{i}>", "special": True}
             for i in range(1000)]
    path.write_text(json.dumps({
        "added_tokens": added,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": TEKKEN_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": False, "ignore_merges": True},
    }))


def test_hf_tokenizer_json_byte_level(tmp_path):
    _tekken_as_tokenizer_json(tmp_path / "tokenizer.json")
    path, kind = _gguf(tmp_path, tmp_path / "tokenizer.json", "tokenizer.json", 3000)
    assert kind == "hf-bpe"
    md, tok = _load(path)
    assert md["tokenizer.ggml.pre"] == "tekken" and tok.kind == "tekken"
    data = json.loads(TEKKEN_V3.read_text())
    ref = Tekkenizer(data["vocab"], list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS), data["config"]["pattern"],
                     vocab_size=3000, num_special_tokens=1000, version=TokenizerVersion.v3)
    assert tok.encode(TEXT) == ref.encode(TEXT, True, False)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.special_id("[INST]") == 3


def test_hf_tokenizer_json_sentencepiece_like(tmp_path):
    """A SentencePiece-derived tokenizer.json (Llama/Mistral v1 style), built from tokenizer.model.v1:
    scores recovered from the merge order reproduce sentencepiece's ids."""
    from convert.tokenizer import read_spm_model

    model = read_spm_model(SPM_V1)
    pieces = [p for p, _, _ in model["pieces"]]
    vocab = {p: i for i, p in enumerate(pieces)}
    # HF's SentencePiece->BPE conversion: merges ordered by the merged piece's score.
    merges = []
    for i, (p, score, typ) in enumerate(model["pieces"]):
        if typ != 1 or len(p) < 2:
            continue
        for j in range(1, len(p)):
            if p[:j] in vocab and p[j:] in vocab:
                merges.append((-score, i, p[:j], p[j:]))
    merges.sort(key=lambda m: (m[0], m[1], vocab[m[2]], vocab[m[3]]))
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 0, "content": "<unk>", "special": True}, {"id": 1, "content": "<s>", "special": True},
                         {"id": 2, "content": "</s>", "special": True}],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for _, _, a, b in merges],
                  "byte_fallback": True, "unk_token": "<unk>", "fuse_unk": True},
    }))
    path, kind = _gguf(tmp_path, tmp_path / "tokenizer.json", "tokenizer.json", 32000)
    assert kind == "hf-spm"
    _, tok = _load(path)
    ref = sentencepiece.SentencePieceProcessor(model_file=str(SPM_V1))
    text = "Hello world, this is a test of merges: tokenization 日本 🎉"
    assert tok.encode(text, bos=False) == ref.encode(text)
    assert tok.decode(tok.encode(TEXT)) == TEXT.replace("▁", " ")
