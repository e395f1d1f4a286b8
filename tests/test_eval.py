"""train/eval.py's pure parts: reading the number of an answer, scoring, splitting a reply, and the
routing statistics on a hand-made routing. No model runs here."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from localmoe.models.decoder import Stats
from train.data import Sample, heldout
from train.encode import Encoder
from train.eval import add_routes, answer_number, main, routes_of, routing_summary, score, split_reply

no_digits = st.text(st.characters(blacklist_categories=("Nd",)), max_size=30)


@given(no_digits, st.integers(-10**9, 10**9), st.sampled_from(("", ".", "!", " ", "\n")), st.integers(0, 10**6))
def test_answer_number_is_the_last_integer(prefix, n, end, earlier):
    assert answer_number(f"{earlier} {prefix} {n}{end}") == n


@pytest.mark.parametrize("text, n", [("The answer is 303", 303), ("The answer is -12.", -12), ("5-3", 3),
                                     ("47 + 385 = 432\nThe answer is 432", 432), ("-0", 0), ("x--7", -7)])
def test_answer_number_cases(text, n):
    assert answer_number(text) == n


@given(no_digits)
def test_answer_number_none_without_digits(text):
    assert answer_number(text) is None


@pytest.mark.parametrize("kind", ["arithmetic", "multistep", "word", "vision"])
def test_reference_replies_score_right(kind):
    for s in heldout(kind, 60, "high"):
        assert score(s, s.thinking, s.answer), (s.answer, s.expected)


def test_only_the_answer_counts():
    s = heldout("arithmetic", 1, "high")[0]
    assert not score(s, s.thinking + "\n" + s.answer, "The answer is 99999")
    assert score(s, None, f"the answer is {s.expected}.")


def test_vision_labels_are_whole_phrases():
    def sample(expected):
        return Sample("vision", [], "none", None, "", expected=expected)
    assert score(sample("top left"), None, "It is at the top left.")
    assert not score(sample("left"), None, "It is at the top left")
    assert score(sample("left"), None, "It is at the left")
    assert score(sample("red"), None, "  It is RED. ")
    assert not score(sample("3"), None, "There are 13")
    assert not score(sample("circle"), None, "")
    pictures = heldout("vision", 80, "none")
    for a, b in itertools.product(pictures, pictures):
        assert score(a, None, b.answer) == (a.expected == b.expected), (a.expected, b.answer)


def test_split_reply():
    tok = Encoder().tok
    think, end = tok.special_id("[THINK]"), tok.special_id("[/THINK]")
    a, b = tok.encode("1 + 2 = 3", bos=False), tok.encode("The answer is 3", bos=False)
    assert split_reply(tok, [think, *a, end, *b, tok.eos_id]) == ("1 + 2 = 3", "The answer is 3")
    assert split_reply(tok, [*b, tok.eos_id]) == (None, "The answer is 3")
    assert split_reply(tok, [think, *a]) == ("1 + 2 = 3", "")


def hand_made_stats() -> Stats:
    """3 layers of 4 experts, k = 2; layer 2 is dense (never routed). A 3-token prompt, then one decode step."""
    stats = Stats(3, 4)
    stats.keep_routing = True
    layers, per_expert = np.array([0, 1]), np.array([100, 100])
    stats.record_routes(0, layers, np.array([[[0, 1], [1, 2], [2, 3]], [[0, 1]] * 3]), per_expert)
    stats.record_routes(1, layers, np.array([[[1, 0]], [[0, 1]]]), per_expert)
    return stats


def test_record_routes_counts_by_hand():
    stats = hand_made_stats()
    assert stats.expert_counts.tolist() == [[2, 3, 2, 1], [4, 4, 0, 0], [0, 0, 0, 0]]
    assert stats.expert_reads == 4 + 2 + 2 + 2          # distinct experts per layer and forward call
    assert stats.expert_bytes == 100 * stats.expert_reads
    assert [(call, layer) for call, layer, _ in stats.routing] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_routing_summary_by_hand():
    routes = routes_of(hand_made_stats())
    assert sorted(routes) == [0, 1]
    assert routes[0].tolist() == [[0, 1], [1, 2], [2, 3], [1, 0]]
    counts, reuse = np.zeros((3, 4), np.int64), np.zeros((3, 3))
    add_routes(counts, reuse, routes)
    add_routes(counts, reuse, routes)                  # a second sequence: no pair across the two
    assert counts.tolist() == [[4, 6, 4, 2], [8, 8, 0, 0], [0, 0, 0, 0]]
    assert reuse[0].tolist() == [6, 4, 2] and reuse[1].tolist() == [6, 6, 6]
    out = routing_summary(counts, reuse, k=2)
    l0, l1 = out["layers"]
    p = np.array([2, 3, 2, 1]) / 8
    assert l0["layer"] == 0 and l0["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert (l0["min_share"], l0["max_share"], l0["unused"]) == (0.125, 0.375, 0)
    assert l0["reuse_any"] == pytest.approx(2 / 3) and l0["reuse_mean"] == pytest.approx(1 / 3)
    assert l1["layer"] == 1 and l1["entropy"] == pytest.approx(0.5) and l1["unused"] == 2
    assert l1["reuse_any"] == l1["reuse_mean"] == 1
    assert not out["every_expert_used"]
    assert out["random"] == pytest.approx({"reuse_any": 5 / 6, "reuse_mean": 0.5})


def test_bad_model_path_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.gguf"), "--jobs", "1"])
    err = capsys.readouterr()
    assert e.value.code == 2 and err.out == "" and err.err.count("\n") == 1 and "missing.gguf" in err.err


def test_bad_set_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["x.gguf", "--sets", "algebra:high"])
    assert e.value.code == 2 and "algebra" in capsys.readouterr().err
