"""Images in conversations: `chat_tokens(..., images=)`, the chat session's prefill of [IMG] positions
(also when the KV cache holds earlier turns), `run --image` and `/image` in chat."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import localmoe
from convert import convert
from localmoe.chat import Reply, Session, message_images
from localmoe.sampling import SamplingParams

from checkpoints import make_mistral3_vision
from tokenizer_files import write_tekken_v15

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def vision_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-images")
    src, _ = make_mistral3_vision(d / "hf", image_size=112)
    write_tekken_v15(src)
    report = convert(src, d / "m.gguf", "f32")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(90, 60), (70, 150)]):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return report.out, paths


def test_chat_tokens_put_images_before_the_text(vision_gguf):
    path, (a, b) = vision_gguf
    m = localmoe.load(path)
    msgs = [{"role": "user", "content": "What is this?"}]
    ids = m.chat_tokens(msgs, images=[a, b])
    parts = [{"type": "image", "image": a}, {"type": "image", "image": b}, {"type": "text", "text": "What is this?"}]
    assert ids == m.chat_tokens([{"role": "user", "content": parts}])
    inst = ids.index(m.tokenizer.special_id("[INST]"))
    ta, tb = m.image_tokens(a), m.image_tokens(b)
    assert ids[inst + 1:inst + 1 + len(ta) + len(tb)] == ta + tb
    text_only = m.chat_tokens(msgs)
    assert ids[:inst + 1] + ids[inst + 1 + len(ta) + len(tb):] == text_only


def _first_token_agrees(m, ids, images, generated):
    ref = m.logits(ids, images=images)[-1]
    assert ref[generated] >= ref.max() - 1e-4


def test_session_prefills_images_also_after_cached_turns(vision_gguf):
    path, (a, b) = vision_gguf
    m = localmoe.load(path)
    s = Session(m, params=SamplingParams(temperature=0.0), max_tokens=3)
    for text, images in (("Describe this.", [a]), ("And this one?", [b])):
        conv = s.conversation(text, images)
        ids = m.chat_tokens(conv, s.effort)
        reply = Reply()
        list(s.send(text, reply, images=images))
        _first_token_agrees(m, ids, message_images(conv), s.cached[len(ids)])
    assert reply.stats.reused_tokens > 0 or not s.messages   # turn 2 reused turn 1's cache


def cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localmoe", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=600)


def test_run_with_images_and_bad_images(vision_gguf, tmp_path):
    path, (a, b) = vision_gguf
    r = cli("run", "-m", path, "--image", a, "--image", b, "-n", "3", "compare these")
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for image in (bad, tmp_path / "missing.png"):
        r = cli("run", "-m", path, "--image", image, "describe")
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
        assert len([l for l in r.stderr.splitlines() if l.strip() and "Compiling" not in l]) == 1, r.stderr


def test_chat_image_command_survives_a_bad_image(vision_gguf, tmp_path):
    path, (a, _) = vision_gguf
    r = cli("chat", "-m", path, "-n", "3", "-t", "0",
            stdin=f"/image {tmp_path / 'missing.png'}\n/image {a}\nwhat is it?\n/exit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "missing.png" in out and f"image {a} attached" in out and "Traceback" not in out
