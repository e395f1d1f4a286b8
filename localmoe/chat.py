"""Conversations: Mistral's prompt formats as code, reasoning effort, the thinking/answer split, and a
session that keeps the KV cache across turns.

Prompt formats follow mistral-common's instruct tokenizers, by the version the converter recorded
(`localmoe.chat.format`):
- v1 (Mixtral 8x7B): the text "[INST] {user} [/INST]" tokenized as a whole; system prompts are put
  before the first user message; the assistant's text as is, then </s>.
- v2, v3: [INST] / [/INST] control tokens around the user text; system prompts before the last user
  message; trailing spaces of assistant text dropped.
- v7, v11, v13: system prompts in [SYSTEM_PROMPT]..[/SYSTEM_PROMPT] where they stand.
- v15 (Small 4): as v13, plus [MODEL_SETTINGS]{"reasoning_effort": ..}[/MODEL_SETTINGS] (JSON, sorted
  keys) before the first [INST]; an effort left unset takes the settings builder's default.
Special tokens are always inserted by id; text is tokenized as text, never parsed for specials.
"""
from __future__ import annotations

import codecs
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from .errors import InputError, ModelFileError
from .gguf.format import KEY_CHAT_EFFORT_DEFAULT, KEY_CHAT_EFFORTS, KEY_CHAT_FORMAT
from .sampling import Sampler, SamplingParams

THINK, END_THINK = "[THINK]", "[/THINK]"
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 1024


# -- prompt formats -------------------------------------------------------------------------------------
def check_messages(messages: list[dict]) -> list[dict]:
    """System messages first, then user and assistant alternating, ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise InputError("a conversation needs at least one user message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not _valid_content(m):
            raise InputError(f"bad message {m!r}: expected {{'role': one of {ROLES}, 'content': str}} "
                             f"(a user message may also hold a list of text and image parts)")
    roles = [m["role"] for m in messages]
    n_system = roles.count("system")
    if roles[:n_system] != ["system"] * n_system:
        raise InputError("system messages must come before the first user message")
    turns = roles[n_system:]
    if turns != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise InputError("messages must alternate user/assistant, starting and ending with a user message")
    if any(m["role"] == "assistant" and not m["content"] for m in messages):
        raise InputError("an assistant message has no content")
    return messages


def _valid_content(m: dict) -> bool:
    c = m.get("content")
    if isinstance(c, str):
        return True
    return m.get("role") == "user" and isinstance(c, list) and all(
        isinstance(p, dict) and ((p.get("type") == "text" and isinstance(p.get("text"), str))
                                 or (p.get("type") == "image" and p.get("image") is not None)) for p in c)


def with_images(messages: list[dict], images) -> list[dict]:
    """The conversation with `images` attached to the last user message, before its text — the order
    mistral-common uses ([ImageChunk..., TextChunk])."""
    if not images:
        return messages
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    content = messages[last]["content"]
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    out = list(messages)
    out[last] = {"role": "user", "content": [{"type": "image", "image": im} for im in images] + parts}
    return out


def message_images(messages: list[dict]) -> list:
    """The images of a conversation in prompt order."""
    return [p["image"] for m in messages if isinstance(m.get("content"), list) for p in m["content"]
            if p["type"] == "image"]


def _version_number(fmt: str) -> int:
    if not fmt.startswith("mistral-v") or not fmt[len("mistral-v"):].isdigit():
        raise ModelFileError(f"unknown prompt format {fmt!r} in the model file")
    return int(fmt[len("mistral-v"):])


@dataclass
class ChatFormat:
    """One model's prompt format: `encode(messages, effort)` -> prompt ids ready for the reply."""

    name: str
    tokenizer: object
    efforts: list[str] = field(default_factory=list)
    default_effort: str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict, tokenizer) -> "ChatFormat":
        name = metadata.get(KEY_CHAT_FORMAT)
        if name is None:
            raise InputError("this model file records no chat format (it was not converted from a Mistral "
                             "tokenizer file); use --raw to give it plain text")
        _version_number(name)
        return cls(name, tokenizer, list(metadata.get(KEY_CHAT_EFFORTS, [])), metadata.get(KEY_CHAT_EFFORT_DEFAULT))

    @property
    def version(self) -> int:
        return _version_number(self.name)

    def check_effort(self, effort: str | None) -> str | None:
        """The effort to encode (the default when None); an error names the accepted values."""
        if effort is None:
            return self.default_effort if self.efforts else None
        if not self.efforts:
            raise InputError(f"this model has no reasoning effort setting (prompt format {self.name}); "
                             f"leave out --effort")
        if effort not in self.efforts:
            raise InputError(f"unknown effort {effort!r}; this model accepts: {', '.join(self.efforts)}")
        return effort

    def encode(self, messages: list[dict], effort: str | None = None, image_tokens=None) -> list[int]:
        """Prompt ids; image parts of user messages become `image_tokens(image)` ids in place."""
        check_messages(messages)
        effort = self.check_effort(effort)
        tok, v = self.tokenizer, self.version
        systems = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        ids = [tok.bos_id]
        if v >= 7:
            for s in systems:
                ids += [tok.special_id("[SYSTEM_PROMPT]"), *tok.encode(s, bos=False), tok.special_id("[/SYSTEM_PROMPT]")]
        system_at = users[0] if v == 1 else users[-1]
        for i, m in enumerate(turns):
            text, images = m["content"], []
            if isinstance(text, list):
                images = [p["image"] for p in text if p["type"] == "image"]
                if images and (v < 7 or image_tokens is None):
                    raise InputError("this model reads no images" if image_tokens is None else
                                     f"images need a prompt format of v7 or later (this model: {self.name})")
            if m["role"] == "assistant":
                ids += tok.encode(text if v == 1 else text.rstrip(" "), bos=False) + [tok.eos_id]
                continue
            if isinstance(text, list):
                text = "".join(p["text"] for p in text if p["type"] == "text")
            if v < 7 and systems and i == system_at:
                text = "\n\n".join(systems) + "\n\n" + text
            if v == 1:
                ids += tok.encode(f"[INST] {text} [/INST]", bos=False)
                continue
            if v >= 15 and i == users[0] and effort is not None:
                ids += self._settings(effort)
            body = [t for p in m["content"] for t in (image_tokens(p["image"]) if p["type"] == "image" else
                                                      tok.encode(p["text"], bos=False))] if images else tok.encode(text, bos=False)
            ids += [tok.special_id("[INST]"), *body, tok.special_id("[/INST]")]
        return ids

    def _settings(self, effort: str) -> list[int]:
        tok = self.tokenizer
        text = json.dumps({"reasoning_effort": effort}, ensure_ascii=False, sort_keys=True)
        return [tok.special_id("[MODEL_SETTINGS]"), *tok.encode(text, bos=False), tok.special_id("[/MODEL_SETTINGS]")]


# -- streaming text -------------------------------------------------------------------------------------
class TokenText:
    """Token ids -> text as it becomes complete UTF-8; [THINK]/[/THINK] tokens become their marker text,
    other special tokens print nothing."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.markers = {tokenizer.special_id(name): name for name in (THINK, END_THINK) if has_special(tokenizer, name)}
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if token_id in self.markers:
            return self.utf8.decode(b"", final=True) + self.markers[token_id]
        if self.tok.is_special(token_id):
            return ""
        return self.utf8.decode(self.tok.token_bytes(token_id))

    def finish(self) -> str:
        return self.utf8.decode(b"", final=True)


def has_special(tokenizer, name: str) -> bool:
    try:
        tokenizer.special_id(name)
        return True
    except ModelFileError:
        return False


def _held_suffix(text: str, needles) -> int:
    """Length of the longest end of `text` that could begin one of `needles` (kept back until known)."""
    for n in range(min(len(text), max(map(len, needles), default=1) - 1), 0, -1):
        if any(needle.startswith(text[-n:]) for needle in needles):
            return n
    return 0


class StopStrings:
    """Cuts a text stream before the first stop string; text that may begin one is held back."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, out, self.pending = True, self.pending[:min(found)], ""
            return out
        keep = _held_suffix(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def finish(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ThinkingSplitter:
    """Splits a text stream into ("thinking", text) and ("answer", text) parts at [THINK] / [/THINK],
    wherever chunk boundaries fall. An unterminated [THINK] leaves the rest as thinking; a stray
    [/THINK] only switches to the answer."""

    def __init__(self):
        self.kind = "answer"
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out = []
        while True:
            hits = [(i, m) for m in (THINK, END_THINK) if (i := self.pending.find(m)) >= 0]
            if not hits:
                break
            i, marker = min(hits)
            out.append((self.kind, self.pending[:i]))
            self.kind = "thinking" if marker == THINK else "answer"
            self.pending = self.pending[i + len(marker):]
        keep = _held_suffix(self.pending, (THINK, END_THINK))
        out.append((self.kind, self.pending[:len(self.pending) - keep]))
        self.pending = self.pending[len(self.pending) - keep:]
        return [(k, t) for k, t in out if t]

    def finish(self) -> list[tuple[str, str]]:
        out, self.pending = self.pending, ""
        return [(self.kind, out)] if out else []


# -- generation with statistics -------------------------------------------------------------------------
@dataclass
class TurnStats:
    prompt_tokens: int = 0       # the whole prompt, cached part included
    reused_tokens: int = 0       # prompt tokens already in the KV cache
    prefill_s: float = 0.0       # time to the first token (prompt processing + one sample)
    decode_tokens: int = 0
    decode_s: float = 0.0
    stop_reason: str = ""        # eos, stop, max_tokens, context, interrupted
    expert_reads: int = 0
    expert_bytes: int = 0

    @property
    def prefilled(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tok_s=round(self.prefilled / max(self.prefill_s, 1e-9), 2),
                 decode_tok_s=round(max(0, self.decode_tokens - 1) / max(self.decode_s, 1e-9), 2),
                 peak_rss_mib=round(peak_rss_mib()))
        return d

    def line(self) -> str:
        d = self.as_dict()
        per_tok = self.expert_bytes / max(1, self.prefilled + self.decode_tokens)
        return (f"prompt {self.prompt_tokens} tok ({self.reused_tokens} cached), {d['prefill_tok_s']:.1f} tok/s | "
                f"time to first token {self.prefill_s:.2f} s | decode {self.decode_tokens} tok, "
                f"{d['decode_tok_s']:.1f} tok/s | peak RSS {d['peak_rss_mib']} MiB | experts read "
                f"{self.expert_reads} ({self.expert_bytes / 2**20:.1f} MiB, {per_tok / 2**20:.2f} MiB/token) | "
                f"stop: {self.stop_reason}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Reply:
    """What one turn produced, filled in while it streams."""
    thinking: str = ""
    answer: str = ""
    stats: TurnStats = field(default_factory=TurnStats)

    def as_dict(self) -> dict:
        return {"thinking": self.thinking, "answer": self.answer, "stats": self.stats.as_dict()}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """A conversation with a model. The KV cache keeps the tokens of earlier turns; each turn prefills
    only what differs from them (the new user message, plus any part of the history whose encoding
    changed), so the history is not recomputed."""

    def __init__(self, model, system: str | None = None, effort: str | None = None,
                 params: SamplingParams | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, stops=()):
        self.model = model
        self.messages: list[dict] = []
        self.system = system or None
        self.effort = effort
        self.params = params or SamplingParams()
        self.max_tokens = max_tokens
        self.stops = list(stops)
        self.cache = model.new_cache()
        self.cached: list[int] = []        # the ids whose keys and values are in self.cache
        self.vectors: dict[str, np.ndarray] = {}   # image projector outputs, by path
        self.last: Reply | None = None

    # conversation state ------------------------------------------------------------------------------
    def set_effort(self, effort: str | None) -> None:
        self.model.chat_format.check_effort(effort)
        self.effort = effort

    def conversation(self, user_text: str | None = None, images=()) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = with_images([{"role": "user", "content": user_text}], list(images)) if user_text is not None else []
        return head + self.messages + tail

    def reset(self) -> None:
        self.messages = []

    def to_json(self) -> dict:
        return {"messages": self.conversation(), "effort": self.effort, "sampling": asdict(self.params)}

    def load_json(self, data) -> None:
        """Replace the conversation with a saved one (validated before anything changes)."""
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise InputError("not a saved conversation (expected an object with a 'messages' list)")
        msgs = data["messages"]
        systems = [m for m in msgs if isinstance(m, dict) and m.get("role") == "system"]
        rest = msgs[len(systems):]
        if rest:
            check_messages(rest + ([{"role": "user", "content": ""}] if rest[-1].get("role") == "assistant" else []))
        if rest and rest[-1]["role"] == "user":
            raise InputError("a saved conversation must end with an assistant reply")
        effort = data.get("effort")
        self.model.chat_format.check_effort(effort)
        params = SamplingParams(**data["sampling"]) if isinstance(data.get("sampling"), dict) else self.params
        self.system = "\n\n".join(m["content"] for m in systems) or None
        self.messages, self.effort, self.params = list(rest), effort, params

    def fit(self, user_text: str, images=()) -> tuple[list[int], int]:
        """Prompt ids for the next turn, dropping the oldest turns while the prompt plus room for the
        reply exceeds the context. Returns (ids, number of turns dropped); a message too long even
        alone is refused before anything is dropped."""
        n_ctx = self.cache.n_ctx
        head = [m for m in self.conversation() if m["role"] == "system"]
        alone = len(self.model.chat_tokens(head + [{"role": "user", "content": user_text}], self.effort, images))
        if alone >= n_ctx:
            raise InputError(f"prompt of {alone} tokens is longer than the context ({n_ctx} tokens)")
        dropped = 0
        while True:
            ids = self.model.chat_tokens(self.conversation(user_text, images), self.effort)
            if len(ids) + min(self.max_tokens, n_ctx // 4) <= n_ctx or not self.messages:
                return ids, dropped
            del self.messages[:2]
            dropped += 1

    # generation --------------------------------------------------------------------------------------
    def send(self, user_text: str, reply: Reply, images=()) -> Iterator[tuple[str, str]]:
        """One chat turn: stream ("notice"|"thinking"|"answer", text) parts, collected into `reply`.
        `images` (paths) go before the text of this user message. The exchange joins the history when
        the turn ends, also when it was interrupted (keeping what was answered so far); a turn without
        any answer is withdrawn."""
        ids, dropped = self.fit(user_text, images)
        if dropped:
            yield "notice", (f"the conversation outgrew the context ({self.cache.n_ctx} tokens): "
                             f"dropped the oldest {dropped} turn{'s' * (dropped > 1)}")
        user = with_images([{"role": "user", "content": user_text}], list(images))
        try:
            yield from self.complete(ids, reply, message_images(self.conversation() + user))
        finally:
            if reply.answer.strip():
                self.messages += user + [{"role": "assistant", "content": reply.answer}]

    def _image_vectors(self, image) -> np.ndarray:
        """The projector outputs of one image, computed once per conversation (keyed by its path)."""
        key = str(image)
        if key not in self.vectors:
            self.vectors[key] = self.model.vision.embeddings([image])
        return self.vectors[key]

    def _embeds(self, ids: list[int], keep: int, images: list):
        """(positions in ids[keep:], vectors) for the [IMG] tokens not already in the cache."""
        if not images:
            return None
        img = np.flatnonzero(np.asarray(ids) == self.model.tokenizer.special_id("[IMG]"))
        vectors = np.concatenate([self._image_vectors(im) for im in images])
        if len(img) != len(vectors):
            raise InputError(f"the prompt has {len(img)} [IMG] tokens for {len(vectors)} image vectors")
        new = img >= keep
        return (img[new] - keep, vectors[new]) if new.any() else None

    def complete(self, ids: list[int], reply: Reply, images=()) -> Iterator[tuple[str, str]]:
        """Generate after prompt `ids` (whose [IMG] tokens belong to `images`, in order), reusing the
        cached prefix; parts are streamed and collected."""
        m, st = self.model, reply.stats
        keep = min(common_prefix(self.cached, ids), len(ids) - 1)
        embeds = self._embeds(ids, keep, list(images))
        self.cache.truncate(keep)
        st.prompt_tokens, st.reused_tokens = len(ids), keep
        fed = list(ids)
        text, stops, split = TokenText(m.tokenizer), StopStrings(self.stops), ThinkingSplitter()
        reads0, bytes0 = m.stats.expert_reads, m.stats.expert_bytes

        def flush():
            return split.feed(stops.feed(text.finish()) + stops.finish()) + split.finish()

        t0 = time.perf_counter()
        t_first = None
        st.stop_reason = "max_tokens"
        try:
            for tok in m.generate_from(self.cache, ids[keep:], Sampler(self.params), self.max_tokens, embeds=embeds):
                t_first = t_first or time.perf_counter()
                st.decode_tokens += 1
                fed.append(tok)
                if tok == m.tokenizer.eos_id:
                    st.stop_reason = "eos"
                    break
                yield from self._collect(split.feed(stops.feed(text.feed(tok))), reply)
                if stops.hit:
                    st.stop_reason = "stop"
                    break
            else:
                if self.cache.length >= self.cache.n_ctx:
                    st.stop_reason = "context"
            yield from self._collect(flush(), reply)
        except (KeyboardInterrupt, GeneratorExit):
            st.stop_reason = "interrupted"
            list(self._collect(flush(), reply))
            raise
        finally:
            self.cached = fed[:self.cache.length]
            t_end = time.perf_counter()
            st.prefill_s = (t_first or t_end) - t0
            st.decode_s = t_end - (t_first or t_end)
            st.expert_reads = m.stats.expert_reads - reads0
            st.expert_bytes = m.stats.expert_bytes - bytes0
            self.last = reply

    def _collect(self, parts, reply: Reply):
        for kind, part in parts:
            self._add(reply, kind, part)
            yield kind, part

    @staticmethod
    def _add(reply: Reply, kind: str, part: str) -> None:
        if kind == "thinking":
            reply.thinking += part
        else:
            reply.answer += part
