"""RangeSet: examples, and random add/remove sequences against a set-of-pages model."""

from __future__ import annotations

import contextlib
import itertools
import random
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membroker import rangeset as rangeset_module
from membroker.rangeset import RangeSet, shared_batch, touching

UNIVERSE = 64


def pages_of(rs: RangeSet) -> set[int]:
    return {p for start, end in rs for p in range(start, end)}


def runs(pages: set[int], start: int, end: int, present: bool) -> list[tuple[int, int]]:
    """Maximal runs of [start, end) whose membership in `pages` is `present`."""
    out: list[tuple[int, int]] = []
    for p in range(start, end):
        if (p in pages) == present:
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + 1)
            else:
                out.append((p, p + 1))
    return out


def assert_canonical(rs: RangeSet) -> None:
    """Sorted, disjoint, non-touching, non-empty intervals."""
    items = list(rs)
    assert len(rs) == len(items)
    assert bool(rs) == bool(items)
    for start, end in items:
        assert start < end
    for (_, end), (start, _) in itertools.pairwise(items):
        assert end < start
    # The chunks: none empty, bounds as recorded, none above twice the cut.
    chunks = list(zip(rs._cs, rs._ce, strict=True))
    assert all(len(s) == len(e) > 0 for s, e in chunks)
    assert all(len(s) <= 2 * rangeset_module._LOAD for s, _ in chunks)
    assert rs._first == [s[0] for s, _ in chunks]
    assert rs._last == [e[-1] for _, e in chunks]


# -- examples -----------------------------------------------------------------------------------


def test_empty() -> None:
    rs = RangeSet()
    assert repr(rs) == "RangeSet([])"
    assert len(rs) == 0
    assert not rs
    assert rs.total() == 0
    assert rs.intersection(0, 10) == []
    assert rs.missing(0, 10) == [(0, 10)]
    assert not rs.overlaps(0, 10)
    assert not rs.covers(0, 1)
    assert rs.first_missing(3, 10) == 3
    assert rs.first_present(0, 10) is None


def test_constructor_sorts_and_merges() -> None:
    rs = RangeSet([(8, 9), (0, 2), (2, 4), (1, 3)])
    assert repr(rs) == "RangeSet([(0, 4), (8, 9)])"
    assert list(rs) == [(0, 4), (8, 9)]
    assert len(rs) == 2
    assert rs.total() == 5


def test_add_merges_touching_and_overlapping() -> None:
    rs = RangeSet([(0, 2), (4, 6), (8, 10)])
    rs.add(2, 4)
    assert repr(rs) == "RangeSet([(0, 6), (8, 10)])"
    rs.add(5, 9)
    assert repr(rs) == "RangeSet([(0, 10)])"
    rs.add(20, 30)
    rs.add(12, 14)
    rs.add(10, 11)
    assert repr(rs) == "RangeSet([(0, 11), (12, 14), (20, 30)])"
    rs.add(29, 31)
    assert repr(rs) == "RangeSet([(0, 11), (12, 14), (20, 31)])"
    rs.add(1, 2)
    assert repr(rs) == "RangeSet([(0, 11), (12, 14), (20, 31)])"


def test_remove_splits_and_trims() -> None:
    rs = RangeSet([(0, 10), (20, 30)])
    rs.remove(3, 5)
    assert repr(rs) == "RangeSet([(0, 3), (5, 10), (20, 30)])"
    rs.remove(8, 25)
    assert repr(rs) == "RangeSet([(0, 3), (5, 8), (25, 30)])"
    rs.remove(0, 100)
    assert repr(rs) == "RangeSet([])"
    rs.remove(0, 1)
    assert not rs


def test_queries() -> None:
    rs = RangeSet([(0, 4), (8, 9), (12, 20)])
    assert rs.intersection(2, 14) == [(2, 4), (8, 9), (12, 14)]
    assert rs.intersection(4, 8) == []
    assert rs.intersection(13, 15) == [(13, 15)]
    assert rs.missing(2, 14) == [(4, 8), (9, 12)]
    assert rs.missing(0, 25) == [(4, 8), (9, 12), (20, 25)]
    assert rs.missing(12, 20) == []
    assert rs.overlaps(3, 5)
    assert not rs.overlaps(4, 8)
    assert rs.covers(12, 20)
    assert not rs.covers(11, 13)
    assert not rs.covers(3, 9)
    assert rs.first_missing(0, 10) == 4
    assert rs.first_missing(12, 20) is None
    assert rs.first_missing(5, 7) == 5
    assert rs.first_present(4, 20) == 8
    assert rs.first_present(13, 30) == 13
    assert rs.first_present(20, 30) is None


def test_intersect_copy_eq() -> None:
    a = RangeSet([(0, 10), (20, 30)])
    b = RangeSet([(5, 25), (28, 40)])
    assert a.intersect(b) == RangeSet([(5, 10), (20, 25), (28, 30)])
    assert b.intersect(a) == a.intersect(b)
    assert a.intersect(RangeSet()) == RangeSet()
    c = a.copy()
    c.add(10, 20)
    assert a == RangeSet([(0, 10), (20, 30)])
    assert c == RangeSet([(0, 30)])
    assert a != c
    assert a != [(0, 10), (20, 30)]


@pytest.mark.parametrize(
    ("start", "end"), [(5, 5), (6, 5), (-1, 3), (0, 2**64)], ids=["empty", "reversed", "neg", "big"]
)
def test_invalid_intervals(start: int, end: int) -> None:
    rs = RangeSet([(0, 10)])
    for method in (
        rs.add,
        rs.remove,
        rs.intersection,
        rs.missing,
        rs.overlaps,
        rs.covers,
        rs.first_missing,
        rs.first_present,
    ):
        with pytest.raises(ValueError, match=r"invalid interval"):
            method(start, end)
    with pytest.raises(ValueError, match=r"invalid interval"):
        RangeSet([(start, end)])
    assert rs == RangeSet([(0, 10)])


def test_a_bad_interval_in_a_small_batch_changes_nothing() -> None:
    """Small batches go in one interval at a time: all are checked before the first."""
    rs = RangeSet([(0, 10), (20, 30)])
    for batch in ([(40, 50), (5, 5)], ((40, 50), (7, 3)), [(40, 50), (-1, 2)]):
        with pytest.raises(ValueError, match=r"invalid interval"):
            rs.add_many(batch)
        with pytest.raises(ValueError, match=r"invalid interval"):
            rs.remove_many([(0, 5), *batch])
    assert rs == RangeSet([(0, 10), (20, 30)])
    rs.add_many([(40, 50), (9, 21)])  # unsorted, overlapping: a union all the same
    assert list(rs) == [(0, 30), (40, 50)]
    rs.remove_many(((45, 60), (0, 1), (44, 46)))
    assert list(rs) == [(1, 30), (40, 44)]


def test_large_page_numbers() -> None:
    top = 2**64 - 1
    rs = RangeSet([(top - 10, top)])
    rs.add(0, 1)
    assert rs.total() == 11
    assert rs.covers(top - 3, top)


def test_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(RangeSet())


# -- properties ---------------------------------------------------------------------------------

# The properties run at the real chunk size (small sets: one chunk) and at tiny ones, where the
# same sets span many chunks that split, merge and vanish, and every batch takes the one-pass
# path (a batch threshold of 0).
CUTS = pytest.mark.parametrize("cut", [None, (1, 0), (2, 0), (3, 16)], ids=str)


@contextlib.contextmanager
def chunking(cut: tuple[int, int] | None) -> Iterator[None]:
    if cut is None:
        yield
        return
    saved = rangeset_module._LOAD, rangeset_module._SMALL_BATCH
    rangeset_module._LOAD, rangeset_module._SMALL_BATCH = cut
    try:
        yield
    finally:
        rangeset_module._LOAD, rangeset_module._SMALL_BATCH = saved


interval = st.tuples(st.integers(0, UNIVERSE - 1), st.integers(1, UNIVERSE)).filter(
    lambda t: t[0] < t[1]
)
ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), interval), max_size=40)


@CUTS
@settings(max_examples=300, deadline=None, database=None)
@given(ops=ops, initial=st.lists(interval, max_size=6), queries=st.lists(interval, max_size=4))
def test_matches_page_set_model(
    cut: tuple[int, int] | None,
    ops: list[tuple[str, tuple[int, int]]],
    initial: list[tuple[int, int]],
    queries: list[tuple[int, int]],
) -> None:
    with chunking(cut):
        rs = RangeSet(initial)
        model = {p for start, end in initial for p in range(start, end)}
        assert pages_of(rs) == model
        assert_canonical(rs)
        for op, (start, end) in ops:
            before = rs.copy()
            if op == "add":
                rs.add(start, end)
                model |= set(range(start, end))
            else:
                rs.remove(start, end)
                model -= set(range(start, end))
            assert pages_of(rs) == model
            assert_canonical(rs)
            assert rs.total() == len(model)
            assert pages_of(before) != model or before == rs
            for q_start, q_end in [*queries, (start, end)]:
                span = set(range(q_start, q_end))
                assert rs.intersection(q_start, q_end) == runs(model, q_start, q_end, True)
                assert rs.missing(q_start, q_end) == runs(model, q_start, q_end, False)
                assert rs.overlaps(q_start, q_end) == bool(span & model)
                assert rs.covers(q_start, q_end) == (span <= model)
                absent = sorted(span - model)
                present = sorted(span & model)
                assert rs.first_missing(q_start, q_end) == (absent[0] if absent else None)
                assert rs.first_present(q_start, q_end) == (present[0] if present else None)
                inside = runs(model, q_start, q_end, True)
                assert rs.hull(q_start, q_end) == (
                    (inside[0][0], inside[-1][1]) if inside else None
                )
                after = [(max(s, q_start), e) for s, e in rs if e > q_start]
                assert rs.window(q_start, 3) == after[:3]


@CUTS
@settings(max_examples=200, deadline=None, database=None)
@given(a=st.lists(interval, max_size=8), b=st.lists(interval, max_size=8))
def test_intersect_and_eq_match_model(
    cut: tuple[int, int] | None, a: list[tuple[int, int]], b: list[tuple[int, int]]
) -> None:
    with chunking(cut):
        ra, rb = RangeSet(a), RangeSet(b)
        both = ra.intersect(rb)
        assert_canonical(both)
        assert pages_of(both) == pages_of(ra) & pages_of(rb)
        assert (ra == rb) == (pages_of(ra) == pages_of(rb))
        assert RangeSet(list(ra)) == ra
        assert eval(repr(ra), {"RangeSet": RangeSet}) == ra


def test_hull_bounds_the_pages_inside_a_window() -> None:
    rs = RangeSet([(2, 4), (10, 12), (20, 30)])
    assert rs.hull(0, 100) == (2, 30)
    assert rs.hull(3, 25) == (3, 25)
    assert rs.hull(4, 10) is None
    assert rs.hull(11, 21) == (11, 21)
    assert rs.hull(12, 20) is None
    assert RangeSet().hull(0, 5) is None


@CUTS
@settings(max_examples=300)
@given(
    initial=st.lists(interval, max_size=10),
    added=st.lists(interval, max_size=10),
    removed=st.lists(interval, max_size=10),
)
def test_bulk_add_and_remove_match_one_by_one(
    cut: tuple[int, int] | None,
    initial: list[tuple[int, int]],
    added: list[tuple[int, int]],
    removed: list[tuple[int, int]],
) -> None:
    with chunking(cut):
        bulk, single = RangeSet(initial), RangeSet(initial)
        bulk.add_many(added)
        for start, end in added:
            single.add(start, end)
        assert bulk == single
        assert_canonical(bulk)
        bulk.remove_many(removed)
        for start, end in removed:
            single.remove(start, end)
        assert bulk == single
        assert_canonical(bulk)
        assert pages_of(bulk) == (
            pages_of(RangeSet(initial)) | {p for s, e in added for p in range(s, e)}
        ) - {p for s, e in removed for p in range(s, e)}


def test_bulk_ops_on_a_million_fragments_are_linear() -> None:
    rs = RangeSet()
    rs.add_many((2 * i, 2 * i + 1) for i in range(1_000_000))
    assert len(rs) == 1_000_000
    rs.add_many((2 * i + 1, 2 * i + 2) for i in range(0, 1_000_000, 2))
    assert len(rs) == 500_000
    rs.remove_many((4 * i, 4 * i + 1) for i in range(500_000))
    assert len(rs) == 500_000 and rs.total() == 1_000_000


def test_removing_a_whole_set_at_once_empties_it_and_nothing_else() -> None:
    """A batch that is exactly the set (a client's whole holding revoked) empties it, whether
    it comes as a list, a generator or a RangeSet, and a copy sharing its chunks keeps them;
    a batch one page short of it, or with one interval more, leaves exactly the difference."""
    fragments = [(3 * i, 3 * i + 2) for i in range(5_000)]
    for batch in (list(fragments), (iv for iv in fragments), RangeSet(fragments)):
        rs = RangeSet(fragments)
        kept = rs.copy()
        rs.remove_many(batch)
        assert not rs and len(rs) == 0 and list(rs) == [] and rs.total() == 0
        assert_canonical(rs)
        assert kept == RangeSet(fragments) and kept.total() == 10_000
        rs.add(7, 9)  # still a working set
        assert list(rs) == [(7, 9)]
    rs = RangeSet(fragments)
    rs.remove_many([*fragments[:-1], (fragments[-1][0], fragments[-1][1] - 1)])
    assert list(rs) == [(3 * 4_999 + 1, 3 * 4_999 + 2)]
    assert_canonical(rs)
    rs = RangeSet(fragments)
    rs.remove_many([*fragments, (50_000, 50_001)])  # not the set: removes what it has
    assert not rs
    assert_canonical(rs)


@pytest.mark.parametrize("count", [3, 16, 17, 400])
def test_a_shared_batch_applies_to_several_sets_as_its_intervals_would(count: int) -> None:
    """`shared_batch` (unsorted, overlapping intervals; a RangeSet once past _SMALL_BATCH)
    added to one set and removed from another gives what the plain list gives, and the
    batch is not changed by either."""
    rng = random.Random(count)
    intervals = [(a, a + rng.randint(1, 9)) for a in (rng.randrange(2_000) for _ in range(count))]
    batch = shared_batch(intervals)
    assert isinstance(batch, RangeSet) == (count > 16)
    start = [(3 * i, 3 * i + 2) for i in range(700)]
    added, removed = RangeSet(start), RangeSet(start)
    added.add_many(batch)
    removed.remove_many(batch)
    want_added, want_removed = RangeSet(start), RangeSet(start)
    want_added.add_many(list(intervals))
    want_removed.remove_many(list(intervals))
    assert added == want_added and removed == want_removed
    assert_canonical(added)
    assert_canonical(removed)
    assert pages_of(RangeSet(batch)) == {p for s, e in intervals for p in range(s, e)}


@pytest.mark.parametrize("items, intervals", [(20, 50), (300, 400)])
def test_touching_finds_the_items_that_overlap_whichever_way_it_compares(
    items: int, intervals: int
) -> None:
    """`touching` keeps, in order, the items whose span overlaps an interval: the same set
    compared pair by pair (20 x 50) as through a RangeSet (300 x 400, past PAIRWISE_MAX), with
    empty spans and intervals overlapping nothing, and an item that only meets an interval's
    end kept out."""
    rng = random.Random(items)
    spans = [(a, a + rng.randint(0, 6)) for a in (rng.randrange(3_000) for _ in range(items))]
    spans.append((100, 100))  # empty
    ivs = [(a, a + rng.randint(0, 5)) for a in (rng.randrange(3_000) for _ in range(intervals))]
    ivs.append((7_000, 7_010))
    spans.append((7_010, 7_020))  # starts where an interval ends
    assert (len(spans) * len(ivs) > rangeset_module.PAIRWISE_MAX) == (items > 20)
    want = [s for s in spans if any(lo < s[1] and s[0] < hi for lo, hi in ivs if lo < hi)]
    want = [s for s in want if s[0] < s[1]]
    assert touching(spans, lambda s: s, ivs) == want
    assert (7_010, 7_020) not in want and (100, 100) not in want
    assert touching([], lambda s: s, ivs) == [] and touching(spans, lambda s: s, []) == []


def test_total_of_a_set_larger_than_one_summing_slice() -> None:
    rs = RangeSet((3 * i, 3 * i + 2) for i in range(200_000))  # three slices and a bit
    assert rs.total() == 400_000
    rs.remove(0, 1)
    assert rs.total() == 399_999


def test_a_change_in_the_middle_of_a_million_fragments_touches_one_chunk() -> None:
    rs = RangeSet.from_columns(
        array("Q", range(0, 2_000_000, 2)), array("Q", range(1, 2_000_001, 2))
    )
    chunks = list(rs._cs)
    assert len(chunks) > 900  # cut into chunks of about a thousand
    middle = 1_000_000
    rs.remove(middle, middle + 1)
    rs.add(middle + 1, middle + 2)  # joins the next fragment: a merge inside one chunk
    rs.add(middle - 1, middle + 1)  # and both neighbours: two fragments become one
    changed = [i for i, (old, new) in enumerate(zip(chunks, rs._cs, strict=True)) if old is not new]
    assert len(rs._cs) == len(chunks) and len(changed) == 1
    assert len(rs) == 999_998 and rs.total() == 1_000_002
    assert rs.intersection(middle - 2, middle + 4) == [(middle - 2, middle + 3)]


def test_chunks_split_when_full_and_merge_when_small() -> None:
    with chunking((2, 0)):
        rs = RangeSet()
        for i in range(20):
            rs.add(3 * i, 3 * i + 1)
        assert len(rs._cs) >= 5 and len(rs) == 20
        assert_canonical(rs)
        for i in range(19):
            rs.remove(3 * i, 3 * i + 1)
        assert len(rs._cs) == 1 and list(rs) == [(57, 58)]
        rs.remove(57, 58)
        assert rs._cs == [] and not rs and rs.columns() == (array("Q"), array("Q"))


copy_ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "copy"]), st.booleans(), interval), max_size=40
)


@CUTS
@settings(max_examples=300, deadline=None, database=None)
@given(ops=copy_ops, initial=st.lists(interval, max_size=6))
def test_copies_share_chunks_but_never_changes(
    cut: tuple[int, int] | None,
    ops: list[tuple[str, bool, tuple[int, int]]],
    initial: list[tuple[int, int]],
) -> None:
    """Two sets that copy each other now and then, each changed on its own: each one always
    holds exactly its own model's pages (a copy shares the chunk arrays until one changes)."""
    with chunking(cut):
        sets = [RangeSet(initial), RangeSet()]
        sets[1] = sets[0].copy()
        models = [pages_of(sets[0]), pages_of(sets[0])]
        for op, which, (start, end) in ops:
            me, other = (1, 0) if which else (0, 1)
            if op == "copy":
                sets[me] = RangeSet(sets[other]) if start % 2 else sets[other].copy()
                models[me] = set(models[other])
            elif op == "add":
                sets[me].add(start, end)
                sets[me].add(UNIVERSE + end, UNIVERSE + end + 1)  # past the end: appended
                models[me] |= set(range(start, end)) | {UNIVERSE + end}
            else:
                sets[me].remove(start, end)
                models[me] -= set(range(start, end))
            for rs, model in zip(sets, models, strict=True):
                assert pages_of(rs) == model
                assert_canonical(rs)
