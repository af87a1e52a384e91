from __future__ import annotations

import random

import pytest

from orcd_core.stops import StopMatcher


def feed(stops, pieces):
    m = StopMatcher(stops)
    out = [m.push(p) for p in pieces]
    return out, m.flush(), m


def test_no_stops_passes_text_through():
    out, tail, m = feed([], ["a", "b", ""])
    assert out == ["a", "b", ""] and tail == "" and not m.stopped


def test_stop_inside_one_piece_cuts_before_it():
    out, tail, m = feed(["END"], ["hello END world"])
    assert out == ["hello "] and tail == "" and m.stopped and m.matched == "END"


def test_stop_across_token_boundaries_is_held_back_then_dropped():
    out, tail, m = feed(["</s>"], ["Hi <", "/", "s", ">more"])
    assert out == ["Hi ", "", "", ""] and m.stopped and tail == ""


def test_false_start_is_released_when_decided():
    out, tail, m = feed(["</s>"], ["a <", "/x", " b"])
    assert out == ["a ", "</x", " b"] and not m.stopped and tail == ""


def test_held_text_is_flushed_at_the_end():
    out, tail, m = feed(["STOP"], ["go ST"])
    assert out == ["go "] and tail == "ST" and not m.stopped


def test_earliest_of_multiple_stops_wins():
    out, _, m = feed(["world", "lo w"], ["hello world"])
    assert out == ["hel"] and m.matched == "lo w"
    out, _, m = feed(["\n\n", "###"], ["x ##", "# y\n\n"])
    assert "".join(out) == "x " and m.matched == "###"


def test_overlapping_prefixes_hold_the_longest_candidate():
    # "aab": after "aa" both "a" suffix and "aa" suffix are prefixes of the stop
    out, tail, m = feed(["aab"], ["xa", "a", "a", "b"])
    assert "".join(out) == "xa" and m.stopped


def test_unicode_stop_sequences():
    out, tail, m = feed(["。", "🙂!"], ["日本語", "です", "🙂", "!", "後"])
    assert "".join(out) == "日本語です" and m.matched == "🙂!"
    out, tail, m = feed(["ñø"], ["añ", "ø", "z"])
    assert "".join(out) == "a" and m.stopped


def test_nothing_after_a_stop():
    m = StopMatcher(["x"])
    assert m.push("ax") == "a"
    assert m.push("more") == "" and m.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_equal_the_whole_text_semantics(seed):
    rng = random.Random(seed)
    alphabet = "ab<>/é😀 "
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    out, tail, m = feed(stops, pieces)
    hits = [text.find(s) for s in stops if s in text]
    expected = text[: min(hits)] if hits else text
    assert "".join(out) + tail == expected
    assert m.stopped == bool(hits)
