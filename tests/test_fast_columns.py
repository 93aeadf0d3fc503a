"""The compiled row-block encoding (``sinks/_fastcolumns.c``) against the pure path (numpy and
Arrow from the objects): the same String columns, the same decimal words, the same batch bytes."""

import os

import pytest
from hypothesis import given, settings, strategies as st

import sinks.columnar as columnar
from sinks.columnar import _int128_words, arrow_stream, block_batch, text_columns
from state.records import WindowRowBlock

COMPILED = columnar._compiled("text_buffers")

if COMPILED is None and os.environ.get("CI"):
    pytest.fail("sinks/_fastcolumns.c was not built: `make install` builds it", pytrace=False)
compiled_only = pytest.mark.skipif(COMPILED is None, reason="the compiled columns are not built (make install)")

TEXT = st.one_of(st.text(), st.text(alphabet=st.characters(codec="ascii")),
                 st.sampled_from(["", "\x00", "a\x00b", "é", "\U0001f600", "lone\ud800", "\udfff"]))
SCALED = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**127), 2**127 - 1),
                   st.integers(-(2**130), 2**130), st.sampled_from([2**63, -(2**63) - 1, 2**127 - 1, -(2**127),
                                                                    2**127, -(2**127) - 1, True, False]))


def pure(monkeypatch) -> None:
    monkeypatch.setattr(columnar, "_fast_text_buffers", None)
    monkeypatch.setattr(columnar, "_fast_int128_words", None)


@compiled_only
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT, TEXT), max_size=30))
def test_text_columns_are_the_pure_ones(rows):
    compiled = text_columns(rows, ("a", "b", "c"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        expected = text_columns(rows, ("a", "b", "c"))
    assert list(compiled) == list(expected)
    for name, array in compiled.items():
        array.validate(full=True)
        assert array.type == expected[name].type and array.equals(expected[name])
        assert array.to_pylist() == expected[name].to_pylist()


@compiled_only
@settings(max_examples=400, deadline=None)
@given(st.lists(SCALED, max_size=30), st.sampled_from([2, 4]))
def test_int128_words_are_the_pure_ones(values, words):
    compiled = _int128_words(values, words)
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        expected = _int128_words(values, words)
    assert (compiled is None) == (expected is None)
    if expected is not None:
        assert compiled.tolist() == expected.tolist()


@compiled_only
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.tuples(TEXT, TEXT, TEXT), st.integers(1, 2**40), SCALED.filter(
    lambda v: -(10**38) < v < 10**38)), min_size=1, max_size=10), min_size=1, max_size=3))
def test_a_row_blocks_batch_is_the_pure_ones_byte_for_byte(drawn):
    blocks = [WindowRowBlock("", 0, 60_000, 3, [key for key, _, _ in rows], tuple(c for _, c, _ in rows),
                             tuple(t for _, _, t in rows)) for rows in drawn]
    compiled = arrow_stream(block_batch(blocks, "usage_aggregates"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        assert compiled == arrow_stream(block_batch(blocks, "usage_aggregates"))


@compiled_only
def test_what_the_compiled_path_declines_the_pure_path_builds():
    """Rows not shaped as keys (a list, a short tuple, a non-str) and non-int sums go the pure way."""
    assert COMPILED([("a", "b")], 3) is None and COMPILED([["a"]], 1) is None and COMPILED([(None,)], 1) is None
    assert text_columns([("a", "\ud800")], ("x", "y"))["y"].to_pylist() == ["?"]
    assert columnar._compiled("int128_words")([1, 1.5], 2) is None
    with pytest.raises(TypeError):
        _int128_words([1, 1.5], 2)


def test_a_stale_build_is_not_used(monkeypatch):
    """A build from another version of ``sinks/_fastcolumns.c`` (``make install`` not run since
    it changed) is left aside: the pure path encodes."""
    _fastcolumns = pytest.importorskip("sinks._fastcolumns")
    monkeypatch.setattr(_fastcolumns, "INTERFACE", columnar._INTERFACE - 1)
    assert columnar._compiled("text_buffers") is None
