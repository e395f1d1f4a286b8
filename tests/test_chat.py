"""Conversation plumbing: the thinking/answer splitter, stop strings, sampling, the chat session's KV
reuse and context trimming, `localmoe run` in pipes, and `localmoe chat` through a real terminal.

The model is the scripted one (scripted.py): after [/INST] it writes [THINK]Okay[/THINK]Hello world
world ...; after other text "Done!" then </s>. So every expected output below follows from its script.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pexpect
import pytest

import localmoe
from localmoe.chat import Reply, Session, StopStrings, ThinkingSplitter
from localmoe.errors import InputError
from localmoe.sampling import Sampler, SamplingParams, token_probabilities

from scripted import ANSWER_HEAD, ANSWER_LOOP, RAW_ANSWER, THINKING

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def answer(n_tokens: int) -> str:
    """The scripted answer after n generated tokens ([THINK], thinking, [/THINK] come first)."""
    return ANSWER_HEAD + ANSWER_LOOP * (n_tokens - 4)


# -- thinking / answer splitting -------------------------------------------------------------------------
def split_all(chunks) -> tuple[str, str]:
    s = ThinkingSplitter()
    parts = [p for c in chunks for p in s.feed(c)] + s.finish()
    return ("".join(t for k, t in parts if k == "thinking"), "".join(t for k, t in parts if k == "answer"))


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("stream, thinking, answer_text", [
    ("Just an answer [with] brackets [THIN", "", "Just an answer [with] brackets [THIN"),   # absent
    ("[THINK]step 1\nstep 2[/THINK]\n\nThe answer.", "step 1\nstep 2", "\n\nThe answer."),  # complete
    ("[THINK]still thinking when the tokens ran out [/THI", "still thinking when the tokens ran out [/THI", ""),
    ("Before[THINK]mid[/THINK]after", "mid", "Beforeafter"),
    ("no open but a stray [/THINK]close", "", "no open but a stray close"),
])
def test_splitter_on_any_chunking(stream, thinking, answer_text):
    rng = random.Random(stream)
    for _ in range(50):
        assert split_all(random_chunks(stream, rng)) == (thinking, answer_text)
    assert split_all(list(stream)) == (thinking, answer_text)        # one character at a time


def test_splitter_streams_without_waiting_for_the_end():
    s = ThinkingSplitter()
    assert s.feed("[THINK]abc") == [("thinking", "abc")]
    assert s.feed("de[/TH") == [("thinking", "de")]                 # "[/TH" may be a marker: held
    assert s.feed("INK]Yes") == [("answer", "Yes")]


def test_stop_strings_cut_and_hold_back():
    s = StopStrings(["STOP", "\n\n"])
    out = [s.feed(c) for c in ("abc ST", "O", "x ST", "OP never")]
    assert "".join(out) == "abc STOx " and s.hit and out[1] == ""
    s = StopStrings(["END"])
    assert s.feed("the EN") + s.finish() == "the EN" and not s.hit


# -- sampling ---------------------------------------------------------------------------------------------
def test_sampling_filters():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = lambda **kw: token_probabilities(logits, SamplingParams(temperature=1.0, **kw))
    np.testing.assert_allclose(p(), [0.5, 0.2, 0.15, 0.1, 0.05])
    np.testing.assert_allclose(p(top_k=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    np.testing.assert_allclose(p(top_p=0.8), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    np.testing.assert_allclose(p(min_p=0.3), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert Sampler(SamplingParams())(logits) == 0
    draws = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits) for _ in range(1)] + \
        [s(logits) for s in [Sampler(SamplingParams(temperature=1.0, seed=seed))] for _ in range(40)]
    assert draws(3) == draws(3) and len(set(draws(3))) > 1


def test_sampling_params_validation():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 2}):
        with pytest.raises(InputError):
            SamplingParams(**bad)
    p = SamplingParams().replace("top-p", "0.9").replace("seed", "7")
    assert (p.top_p, p.seed) == (0.9, 7)
    for name, value in (("top_p", "x"), ("nope", "1"), ("temperature", "-3")):
        with pytest.raises(InputError):
            SamplingParams().replace(name, value)


# -- the session ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(scripted_gguf):
    return localmoe.load(scripted_gguf, n_ctx=96)


def run_turn(session: Session, text: str) -> Reply:
    reply = Reply()
    parts = list(session.send(text, reply))
    assert "".join(p for k, p in parts if k == "answer") == reply.answer
    return reply


def test_session_reuses_the_kv_cache_across_turns(model):
    s = Session(model, effort="high", max_tokens=7)
    first = run_turn(s, "hi")
    assert (first.thinking, first.answer, first.stats.stop_reason) == (THINKING, answer(7), "max_tokens")
    prompt1 = model.chat_tokens([{"role": "user", "content": "hi"}], "high")
    second = run_turn(s, "again")
    prompt2 = model.chat_tokens(s.conversation()[:-1], "high")
    # everything up to the first reply is reused: the cache keeps [THINK]..[/THINK], the history
    # holds the answer only, so they part right after the first prompt
    assert second.stats.reused_tokens == len(prompt1)
    assert second.stats.prompt_tokens == len(prompt2)
    assert s.cached[:len(prompt2)] == prompt2
    # a fresh model computes the same logits as the reused cache: the reply is the same
    assert second.answer == first.answer


def test_generate_runs_no_step_after_the_last_token(model):
    """max_tokens=n: one prefill pass and n - 1 decode steps (the last token's logits would go unused), the
    tokens those of stepping by hand, and the cache one short of them."""
    ids = model.chat_tokens([{"role": "user", "content": "hi"}], "high")
    cache = model.new_cache()
    model.stats.reset()
    tokens = list(model.generate_from(cache, ids, max_tokens=5, stop=()))
    assert model.stats.forward_calls == 1 + 4 and cache.length == len(ids) + 4
    by_hand, c2 = [], model.new_cache()
    logits = model.prefill(np.array(ids), c2)[-1]
    for _ in range(5):
        by_hand.append(int(np.argmax(logits)))
        logits = model.net.forward(np.array(by_hand[-1:]), c2, last_only=True)[-1]
    assert tokens == by_hand


def test_session_drops_the_oldest_turns_when_the_context_is_full(model):
    s = Session(model, system="Be brief.", effort="none", max_tokens=6)
    notices = []
    for i in range(8):
        reply = Reply()
        notices += [p for k, p in s.send(f"question {i} " + "word " * 6, reply) if k == "notice"]
        assert reply.answer
    assert notices and all("dropped the oldest" in n for n in notices)
    conv = s.conversation()
    assert conv[0] == {"role": "system", "content": "Be brief."} and conv[-2]["content"].startswith("question 7")
    assert len(model.chat_tokens(conv[:-1], "none")) <= model.n_ctx
    with pytest.raises(InputError, match="longer than the context"):
        list(s.send("word " * 200, Reply()))
    assert s.conversation()[-2]["content"].startswith("question 7")   # the failed turn left no trace


def test_interrupted_turn_keeps_the_partial_answer(model):
    s = Session(model, effort="high", max_tokens=50)
    reply = Reply()
    parts = s.send("hi", reply)
    for kind, _ in parts:
        if kind == "answer" and len(reply.answer) > len(ANSWER_HEAD):
            break
    parts.close()                                   # what Ctrl-C does to the stream
    assert reply.stats.stop_reason == "interrupted"
    assert s.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply.answer}]
    assert s.cached == s.cached[:s.cache.length] and len(s.cached) == s.cache.length
    assert run_turn(s, "more").answer.startswith(ANSWER_HEAD)


# -- `localmoe run` in pipes --------------------------------------------------------------------------------
def localmoe_cli(*args, stdin: str = "", env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmoe", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env or ENV, timeout=300)


def test_pipe_stdout_holds_only_the_answer(scripted_gguf):
    r = localmoe_cli("run", "-m", scripted_gguf, "-n", "6", "--effort", "high", "hi")
    assert (r.returncode, r.stdout) == (0, answer(6) + "\n"), r.stderr
    assert THINKING not in r.stderr
    r = localmoe_cli("run", "-m", scripted_gguf, "-n", "6", "--show-thinking", "--verbose", "hi")
    assert (r.returncode, r.stdout) == (0, answer(6) + "\n"), r.stderr
    assert THINKING in r.stderr and "tok/s" in r.stderr and "time to first token" in r.stderr
    assert "peak RSS" in r.stderr and "experts read" in r.stderr


def test_json_output(scripted_gguf):
    r = localmoe_cli("run", "-m", scripted_gguf, "-n", "7", "--json", "--system", "S", stdin="notes\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["thinking"], out["answer"]) == (THINKING, answer(7))
    st = out["stats"]
    assert st["stop_reason"] == "max_tokens" and st["decode_tokens"] == 7
    m = localmoe.load(scripted_gguf)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "notes\n\nhi"}]
    assert st["prompt_tokens"] != len(m.chat_tokens(conv))           # the prompt was "notes" alone
    assert st["prompt_tokens"] == len(m.chat_tokens(conv[:1] + [{"role": "user", "content": "notes"}]))


def test_stdin_comes_before_the_prompt_and_raw_mode(scripted_gguf):
    r = localmoe_cli("run", "-m", scripted_gguf, "--raw", "--json", "the end", stdin="notes\n")
    out = json.loads(r.stdout)
    m = localmoe.load(scripted_gguf)
    assert out["stats"]["prompt_tokens"] == len(m.tokenizer.encode("notes\n\nthe end", bos=True))
    assert (out["answer"], out["thinking"], out["stats"]["stop_reason"]) == (RAW_ANSWER, "", "eos")
    r = localmoe_cli("run", "-m", scripted_gguf, "--raw", "--stop", "!", "x")
    assert (r.returncode, r.stdout) == (0, RAW_ANSWER[:-1] + "\n")


def test_interrupted_run_exits_130_after_the_partial_answer(scripted_gguf):
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "run", "-m", str(scripted_gguf), "-n", "5000", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    head = proc.stdout.read(len(ANSWER_HEAD + ANSWER_LOOP))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert (head + out).startswith(ANSWER_HEAD + ANSWER_LOOP) and (head + out).endswith("\n")


@pytest.mark.parametrize("args, stdin, words", [
    (["--effort", "medium", "hi"], "", ["unknown effort 'medium'", "none, high"]),
    (["hi"], "", []),                                   # placeholder replaced below: unknown preset
    ([], "", ["no prompt"]),
    ([], "  \n\n", ["no prompt"]),
    (["--raw", "--effort", "high", "hi"], "", ["--raw"]),
    (["--top-p", "0", "hi"], "", ["top-p"]),
    (["--show-thinking", "--hide-thinking", "hi"], "", ["exclude"]),
])
def test_run_bad_input(scripted_gguf, tmp_path, args, stdin, words):
    model = scripted_gguf if words else "no-such-preset"
    words = words or ["unknown model 'no-such-preset'"]
    r = localmoe_cli("run", "-m", model, *args, stdin=stdin, env={**ENV, "LOCALMOE_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and "Compiling kernels" not in l]
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr


def test_presets(tmp_path):
    env = {**ENV, "LOCALMOE_HOME": str(tmp_path)}
    r = localmoe_cli("models", env=env)
    assert r.returncode == 0
    for name in ("mistral-small-4", "mixtral-8x7b", "demo"):
        assert name in r.stdout
    assert "not converted" in r.stdout and "demo (default)" in r.stdout and "none, high" in r.stdout
    r = localmoe_cli("run", "-m", "mistral-small-4", "hi", env=env)
    assert r.returncode == 2 and "localmoe convert" in r.stderr and str(tmp_path) in r.stderr


# -- `localmoe chat` through a pseudo-terminal ----------------------------------------------------------------
PROMPT = ">>> "


def spawn_chat(gguf, home, *args) -> pexpect.spawn:
    env = {**ENV, "LOCALMOE_HOME": str(home), "TERM": "xterm"}
    c = pexpect.spawn(sys.executable, ["-m", "localmoe", "chat", "-m", str(gguf), *args], env=env,
                      encoding="utf-8", timeout=120, dimensions=(50, 150))
    c.expect_exact(PROMPT)
    return c


def say(c: pexpect.spawn, line: str) -> str:
    c.sendline(line)
    c.expect_exact(PROMPT)
    return c.before


def test_chat_in_a_terminal(scripted_gguf, tmp_path):
    c = spawn_chat(scripted_gguf, tmp_path, "-n", "6")
    first = say(c, "hello there")
    assert "\x1b[2m" + THINKING in first and answer(6) in first         # thinking dimmed, then the answer
    assert first.index(THINKING) < first.index(answer(6))
    assert answer(6) in say(c, "second turn")
    assert "effort: high" in say(c, "/effort high")
    assert answer(6) in say(c, "think now")
    c.sendline('"""')
    c.sendline("line one")
    c.sendline('line two"""')
    c.expect_exact(PROMPT)
    assert "saved 4 turns" in say(c, f"/save {tmp_path / 'conv.json'}")
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == \
        ["hello there", "second turn", "think now", "line one\nline two"]
    assert saved["effort"] == "high" and all(m["content"] == answer(6) for m in saved["messages"][1::2])
    assert "new conversation" in say(c, "/reset")
    assert "loaded 4 turns" in say(c, f"/load {tmp_path / 'conv.json'}")
    stats = say(c, "/stats")
    assert "context:" in stats and "no reply yet" not in stats
    # Ctrl-C during a long reply stops it and keeps the conversation
    say(c, "/set max_tokens 5000")
    c.sendline("a long one")
    c.expect_exact(ANSWER_HEAD + ANSWER_LOOP * 3)
    c.sendintr()
    c.expect_exact("[stopped]")
    c.expect_exact(PROMPT)
    after = say(c, "/stats")
    assert "stop: interrupted" in after
    say(c, "/set max_tokens 6")
    assert answer(6) in say(c, "and after that?")
    say(c, f"/save {tmp_path / 'conv2.json'}")
    saved = json.loads((tmp_path / "conv2.json").read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"][-2:] == ["a long one", "and after that?"]
    assert saved[-3]["content"].startswith(ANSWER_HEAD + ANSWER_LOOP * 3)
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_chat_bad_input_keeps_the_session(scripted_gguf, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    c = spawn_chat(scripted_gguf, tmp_path, "-n", "6", "--system", "Be brief.", "--hide-thinking")
    for command, words in ((f"/load {tmp_path / 'missing.json'}", "no such file"),
                           (f"/load {tmp_path / 'bad.json'}", "not a saved conversation"),
                           (f"/load {tmp_path / 'wrong.json'}", "alternate"),
                           ("/effort medium", "accepts: none, high"),
                           ("/set temperature warm", "invalid value"),
                           ("/set max_tokens 0", "invalid value"),
                           ("/frobnicate", "unknown command")):
        out = say(c, command)
        lines = [l for l in out.splitlines()[1:] if l.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in out, out
    out = say(c, "still here?")
    assert answer(6) in out and THINKING not in out
    assert "Be brief." in say(c, "/system")
    c.sendeof()
    c.expect(pexpect.EOF)


def test_chat_history_persists_across_sessions(scripted_gguf, tmp_path):
    c = spawn_chat(scripted_gguf, tmp_path)
    say(c, "/system remember me")
    c.sendeof()
    c.expect(pexpect.EOF)
    c = spawn_chat(scripted_gguf, tmp_path)
    c.send("\x1b[A")                                   # Up: the last line of the previous session
    c.expect_exact("/system remember me")
    c.sendline("")
    c.expect_exact(PROMPT)
    c.sendeof()
    c.expect(pexpect.EOF)
