"""Offline text for text models: sentences from the stdlib docstrings, in three disjoint stable sets."""
from __future__ import annotations

import pytest

from amc.data import split_sentences, text_sentences, text_split_sizes
from amc.errors import DataError


def test_sets_are_large_disjoint_and_deduplicated() -> None:
    sizes = text_split_sizes()
    assert set(sizes) == {"calibration", "heldout", "retrieval"}
    assert sizes["calibration"] >= 300 and sizes["heldout"] >= 300 and sizes["retrieval"] >= 150
    sets = {k: text_sentences(k) for k in sizes}
    for k, v in sets.items():
        assert len(v) == len(set(v)) == sizes[k]
    assert not set(sets["calibration"]) & set(sets["heldout"])
    assert not set(sets["calibration"]) & set(sets["retrieval"])
    assert not set(sets["heldout"]) & set(sets["retrieval"])


def test_sentences_are_prose() -> None:
    for s in text_sentences("heldout", n=200):
        assert 6 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?"
        assert ">>>" not in s and "(" not in s.replace(" (", "")  # no calls such as f(x)


def test_prefixes_are_stable() -> None:
    assert text_sentences("calibration", n=20) == text_sentences("calibration")[:20]
    assert text_sentences("retrieval", n=5) == text_sentences("retrieval", n=5)


def test_split_sentences_drops_code_and_keeps_prose() -> None:
    doc = ("Return the sum of two numbers given as arguments. Use it often!\n\n"
           ">>> add(1, 2)\n3\n\nSee also the function call_other_thing(x) for more.")
    assert split_sentences(doc) == ["Return the sum of two numbers given as arguments."]


def test_bad_arguments_raise_data_error() -> None:
    with pytest.raises(DataError, match="unknown text split"):
        text_sentences("test")
    with pytest.raises(DataError, match="positive int"):
        text_sentences("heldout", n=0)
    with pytest.raises(DataError, match="ask for fewer"):
        text_sentences("retrieval", n=10 ** 6)
