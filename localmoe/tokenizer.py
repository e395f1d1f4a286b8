"""The runtime tokenizer, built from GGUF metadata alone (llama.cpp's tokenizer keys).

- "gpt2" vocabularies (tekken and other byte-level BPE): tiktoken with the ranks recovered from the
  GPT-2 byte-to-unicode token strings. Token ids are the tiktoken ranks directly (tekken's rank r is
  id r + number of special tokens; the offset does not change the merge order), so ids equal
  mistral-common's `Tekkenizer.encode`.
- "llama" vocabularies (SentencePiece BPE): SentencePiece's BPE algorithm on pieces, scores and
  types, equal to `sentencepiece.SentencePieceProcessor.encode` for identity-normalised models.

Special-token strings inside the text are never parsed as specials (mistral-common and sentencepiece
behave the same); build prompts from ids with `special_id`.
"""
from __future__ import annotations

import codecs
import heapq
import re
from abc import ABC, abstractmethod
from itertools import groupby

import numpy as np

from .errors import ModelFileError
from .gguf.format import KEY_TOKENIZER_PATTERN, KEY_TOKENIZER_VERSION

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PRE_PATTERNS = {"tekken": TEKKEN_PATTERN, "default": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "gpt-2": GPT2_PATTERN}

SPACE = "\u2581"  # SentencePiece's "▁"
UNK_SURFACE = " \u2047 "  # sentencepiece decodes <unk> as " ⁇ "


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (as in Transformers and llama.cpp)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _gpt2_byte_table() -> np.ndarray:
    pairs = bytes_to_unicode()
    table = np.full(max(map(ord, pairs.values())) + 2, -1, dtype=np.int16)  # the last entry: every larger code
    for b, c in pairs.items():
        table[ord(c)] = b
    return table


_GPT2_TABLE = _gpt2_byte_table()  # code point of a GPT-2 byte character -> its byte, -1 elsewhere


def _replace_bytewise(err: UnicodeDecodeError):
    """One U+FFFD per byte of an invalid UTF-8 sequence, as sentencepiece decodes byte pieces."""
    return "\ufffd", err.start + 1


_BYTEWISE = "localmoe-replace-bytewise"
codecs.register_error(_BYTEWISE, _replace_bytewise)


class Tokenizer(ABC):
    """Common interface; see `load_tokenizer`."""

    kind: str           # "tekken", "bpe" (other byte-level BPE) or "spm"
    version: str | None  # localmoe.tokenizer.version ("v15", "spm"...), None if the file has none
    vocab_size: int
    bos_id: int
    eos_id: int

    def __init__(self, metadata: dict, kind: str):
        tokens = metadata["tokenizer.ggml.tokens"]
        self.kind = kind
        self.tokens: list[str] = list(tokens)
        self.vocab_size = len(self.tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        self.types = (np.asarray(types, dtype=np.int32) if types is not None
                      else np.full(self.vocab_size, NORMAL, dtype=np.int32))
        if len(self.types) != self.vocab_size:
            raise ModelFileError(f"tokenizer: {len(self.types)} token types for {self.vocab_size} tokens")
        self.version = metadata.get(KEY_TOKENIZER_VERSION)
        # Named tokens a prompt may need by name: control, unknown and user-defined ones.
        self._named: dict[str, int] = {}
        for i in np.flatnonzero((self.types == CONTROL) | (self.types == UNKNOWN) | (self.types == USER_DEFINED)):
            self._named.setdefault(self.tokens[i], int(i))
        self.bos_id = self._id_key(metadata, "bos", "<s>")
        self.eos_id = self._id_key(metadata, "eos", "</s>")
        self.unk_id = self._id_key(metadata, "unknown", "<unk>", required=False)
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        # Tokens that print nothing (mistral-common / sentencepiece skip them when decoding).
        self._silent: list[bool] = ((self.types == CONTROL) | (self.types == UNUSED) | (self.types == UNKNOWN)).tolist()

    def _id_key(self, metadata: dict, name: str, default: str, required: bool = True) -> int:
        v = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if v is not None and 0 <= int(v) < self.vocab_size:
            return int(v)
        if default in self._named:
            return self._named[default]
        if required:
            raise ModelFileError(f"tokenizer: no {name} token")
        return -1

    # -- interface ------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def special_id(self, name: str) -> int:
        """Id of a special token by its text, e.g. "[INST]", "[THINK]", "</s>"."""
        try:
            return self._named[name]
        except KeyError:
            raise ModelFileError(f"the model's tokenizer has no special token {name!r}") from None

    def is_special(self, token_id: int) -> bool:
        return self._silent[token_id]

    def piece(self, token_id: int) -> str:
        """The token's text: special tokens as their name (e.g. "[INST]"), others as decoded bytes."""
        if self._silent[token_id]:
            return self.tokens[token_id]
        return self.token_bytes(token_id).decode("utf-8", "replace")

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of plain text (no BOS/EOS, special-token strings not parsed)."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (b"" for special tokens), for streaming output."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of ids, special tokens skipped."""


class BPETokenizer(Tokenizer):
    """Byte-level BPE ("gpt2" model: tekken and others) through tiktoken."""

    def __init__(self, metadata: dict, kind: str):
        import tiktoken

        super().__init__(metadata, kind)
        pre = metadata.get("tokenizer.ggml.pre", "default")
        pattern = metadata.get(KEY_TOKENIZER_PATTERN) or _PRE_PATTERNS.get(pre)
        if pattern is None:
            raise ModelFileError(f"tokenizer: unsupported byte-level BPE pre-tokenizer {pre!r}")
        normal = np.flatnonzero(self.types == NORMAL).tolist()
        tokens = self.tokens
        strs = [tokens[i] for i in normal]
        # GPT-2 characters -> bytes for all normal tokens at once, through UTF-32 code points and a
        # lookup table (131k tokens in ~20 ms).
        codes = np.frombuffer("".join(strs).encode("utf-32-le", "replace"), dtype="<u4")
        byte_vals = _GPT2_TABLE[np.minimum(codes, len(_GPT2_TABLE) - 1)]
        if (byte_vals < 0).any():
            raise ModelFileError("tokenizer: a byte-level token has a character outside GPT-2's byte alphabet")
        joined = byte_vals.astype(np.uint8).tobytes()
        ends = np.cumsum(list(map(len, strs))).tolist()
        starts = [0] + ends[:-1]
        pieces = [joined[a:b] for a, b in zip(starts, ends)]
        self._bytes: list[bytes] = [b""] * self.vocab_size
        for i, tb in zip(normal, pieces):
            self._bytes[i] = tb
        ranks = dict(zip(reversed(pieces), reversed(normal)))  # the first id wins for duplicates
        for i in np.flatnonzero(self.types == USER_DEFINED).tolist():
            self._bytes[i] = tokens[i].encode("utf-8")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ModelFileError(f"tokenizer: byte-level vocabulary lacks {len(missing)} single-byte tokens")
        self._enc = tiktoken.Encoding(f"localmoe-{kind}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        # User-defined tokens match whole before BPE (llama.cpp does the same); tekken has none.
        user = sorted((tokens[i] for i in np.flatnonzero(self.types == USER_DEFINED)), key=len, reverse=True)
        self._user = {t: self._named[t] for t in user}
        self._user_re = re.compile("(" + "|".join(map(re.escape, user)) + ")") if user else None

    def _encode(self, text: str) -> list[int]:
        if self._user_re is None:
            return self._enc.encode_ordinary(text)
        out: list[int] = []
        for k, part in enumerate(self._user_re.split(text)):
            if k % 2:
                out.append(self._user[part])
            elif part:
                out.extend(self._enc.encode_ordinary(part))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode(self, ids) -> str:
        # As mistral-common: runs of ordinary tokens decoded separately (errors replaced), specials skipped.
        out = []
        for silent, group in groupby((int(i) for i in ids), self._silent.__getitem__):
            if not silent:
                out.append(b"".join(self._bytes[t] for t in group).decode("utf-8", "replace"))
        return "".join(out)


class SPMTokenizer(Tokenizer):
    """SentencePiece BPE ("llama" model) from pieces, scores and types; equal to sentencepiece."""

    def __init__(self, metadata: dict, kind: str = "spm"):
        super().__init__(metadata, kind)
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ModelFileError("tokenizer: SentencePiece vocabulary without scores")
        self.scores = np.asarray(scores, dtype=np.float32).tolist()
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        self.remove_extra_whitespaces = bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False))
        types = self.types.tolist()
        # sentencepiece: normal, user-defined and unused pieces take part in merges; control, unknown
        # and byte pieces are "reserved" (looked up first when mapping a final piece to its id).
        self._pieces: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._byte_ids = [-1] * 256
        for i, (t, typ) in enumerate(zip(self.tokens, types)):
            if typ in (NORMAL, USER_DEFINED, UNUSED):
                self._pieces.setdefault(t, i)
            else:
                self._reserved.setdefault(t, i)
                if typ == BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                    self._byte_ids[int(t[3:5], 16)] = i
        self._byte_fallback = all(i >= 0 for i in self._byte_ids)
        self._unused = {i for i, typ in enumerate(types) if typ == UNUSED}
        if self.unk_id < 0:
            raise ModelFileError("tokenizer: SentencePiece vocabulary without an unknown token")
        user = sorted((t for t, typ in zip(self.tokens, types) if typ == USER_DEFINED), key=len, reverse=True)
        self._user_re = re.compile("|".join(map(re.escape, user))) if user else None
        self._bytes: list[bytes] = []
        for t, typ in zip(self.tokens, types):
            if typ == BYTE and len(t) == 6:
                self._bytes.append(bytes([int(t[3:5], 16)]))
            elif typ in (CONTROL, UNUSED):
                self._bytes.append(b"")
            elif typ == UNKNOWN:
                self._bytes.append(UNK_SURFACE.encode())
            else:
                self._bytes.append(t.replace(SPACE, " ").encode("utf-8"))

    # -- encoding -------------------------------------------------------------------------------------
    def _normalize(self, text: str) -> str:
        if self.remove_extra_whitespaces:
            text = re.sub(" +", " ", text).strip(" ")
        if not text:
            return ""
        if self.add_space_prefix:
            text = " " + text
        return text.replace(" ", SPACE)

    def _symbols(self, text: str) -> tuple[list[str], list[bool]]:
        """Split into characters; user-defined pieces (longest match) stay whole and never merge."""
        if self._user_re is None:
            return list(text), [False] * len(text)
        syms, frozen, pos = [], [], 0
        for m in self._user_re.finditer(text):
            syms.extend(text[pos:m.start()])
            frozen.extend([False] * (m.start() - pos))
            syms.append(m.group())
            frozen.append(True)
            pos = m.end()
        syms.extend(text[pos:])
        frozen.extend([False] * (len(text) - pos))
        return syms, frozen

    def _encode(self, text: str) -> list[int]:
        text = self._normalize(text)
        if not text:
            return []
        syms, frozen = self._symbols(text)
        n = len(syms)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        pieces, scores, unused = self._pieces, self.scores, self._unused
        heap: list = []
        rev_merge: dict[str, tuple[str, str]] = {}

        def add_pair(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            merged = syms[left] + syms[right]
            i = pieces.get(merged)
            if i is None:
                return
            heapq.heappush(heap, (-scores[i], left, right, merged))
            if i in unused:
                rev_merge[merged] = (syms[left], syms[right])

        for k in range(n - 1):
            add_pair(k, k + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                continue
            syms[left], syms[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add_pair(prv[left], left)
            add_pair(left, nxt[left])

        out: list[int] = []
        reserved, unk, byte_ids = self._reserved, self.unk_id, self._byte_ids
        prev_unk = False

        def emit(w: str) -> None:
            nonlocal prev_unk
            i = reserved.get(w)
            if i is None:
                i = pieces.get(w, unk)
            if i in unused and w in rev_merge:
                a, b = rev_merge[w]
                emit(a)
                emit(b)
                return
            if i == unk:
                if self._byte_fallback:
                    out.extend(byte_ids[b] for b in w.encode("utf-8"))
                    prev_unk = False
                elif not prev_unk:  # runs of unknown pieces become one <unk>
                    out.append(unk)
                    prev_unk = True
                return
            out.append(i)
            prev_unk = False

        k = 0
        while k >= 0:
            emit(syms[k])
            k = nxt[k]
        return out

    # -- decoding -------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token for streaming ("▁" as a space, <0xXX> as its byte, specials b"")."""
        return self._bytes[token_id]

    def decode(self, ids) -> str:
        """As sentencepiece's decode: control tokens skipped, the dummy-prefix space of the first piece
        dropped, <unk> as " ⁇ ", each byte of an invalid UTF-8 sequence as U+FFFD."""
        ids = [int(i) for i in ids]
        # Byte runs end at every non-byte piece (normal pieces are whole characters; control ones split).
        data = "".join(b"".join(self._bytes[t] for t in group).decode("utf-8", _BYTEWISE)
                       for _, group in groupby(ids, self._silent.__getitem__))
        if self.add_space_prefix:
            first = next((i for i in ids if self._bytes[i]), None)
            if first is not None and self.types[first] not in (BYTE, UNKNOWN) and self.tokens[first].startswith(SPACE):
                data = data[1:]
        return data


def load_tokenizer(metadata: dict) -> Tokenizer:
    """The tokenizer described by a GGUF file's metadata (`GGUFFile(path).metadata`)."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise ModelFileError("the model file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        return BPETokenizer(metadata, "tekken" if pre == "tekken" else "bpe")
    if model == "llama":
        return SPMTokenizer(metadata)
    raise ModelFileError(f"unsupported tokenizer model {model!r} (supported: gpt2/tekken, llama/SentencePiece)")
