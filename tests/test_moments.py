"""Mergeable statistics: moments, merge_moments, normalize; against the float64 reference and
against single-call forward on the whole batch."""
import numpy as np
import pytest

import fastbn

import reference
from _util import Snapshot, assert_close, each_dtype, each_layout, make_case, make_x, tol_for


def _split(x, sizes):
    """x cut along axis 0 into consecutive pieces of the given sizes (some may be 0)."""
    assert sum(sizes) == x.shape[0]
    return np.split(x, np.cumsum(sizes)[:-1], axis=0)


def _sizes(n, rng, parts):
    """`parts` sizes adding up to n, at random, one of them 0 when there are 3 or more."""
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [n]]))
    if parts >= 3:
        sizes[1], sizes[0] = 0, sizes[0] + sizes[1]
    return [int(s) for s in sizes]


@each_dtype
@each_layout
def test_moments_match_the_reference(layout, dtype, rng):
    x = make_x(rng, layout.small, layout.axis, dtype, offset=rng.uniform(-1e4, 1e4,
                                                                       layout.small[layout.axis]))
    got = fastbn.moments(x, axis=layout.axis)
    assert isinstance(got, fastbn.Moments)
    for a, b, name in zip(got, reference.moments(x, layout.axis), got._fields):
        assert a.dtype == np.float64 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("offset", [0.0, 1e8])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@each_layout
def test_merged_chunks_equal_the_whole_batch(layout, parts, offset, rng):
    """Statistics of data taken chunk by chunk: merging per-chunk moments (empty chunks too)
    gives the whole batch's, however it is cut."""
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, np.float64, offset=offset + rng.uniform(-10, 10, c), scale=1.0)
    chunks = _split(x, _sizes(shape[0], rng, parts))
    merged = fastbn.merge_moments(*(fastbn.moments(p, axis=axis) for p in chunks))
    count, mean, m2 = reference.moments(x, axis)
    np.testing.assert_array_equal(merged.count, count)
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-15, atol=1e-13)
    # Each chunk's mean is a float64, rounded by up to ε·|mean|; that is all the merge loses
    # (about ε·|mean|/std relative in M2: 2e-9 for a mean of 1e8 and a std of 1).
    np.testing.assert_allclose(merged.m2, m2, rtol=1e-12 + 20 * 2.2e-16 * offset)


def test_merge_is_in_the_order_given_and_ignores_empty_parts(rng):
    x = make_x(rng, (12, 4), 1)
    a, b = fastbn.moments(x[:5]), fastbn.moments(x[5:])
    empty = fastbn.moments(x[:0])
    assert not empty.count.any() and not empty.mean.any() and not empty.m2.any()
    assert not np.shares_memory(empty.mean, empty.m2)
    ab = fastbn.merge_moments(a, b)
    for with_empty in (fastbn.merge_moments(empty, a, b), fastbn.merge_moments(a, empty, b),
                       fastbn.merge_moments(a, b, empty)):
        for u, v in zip(ab, with_empty):
            assert u.tobytes() == v.tobytes()
    only = fastbn.merge_moments(a)
    assert all(np.array_equal(u, v) for u, v in zip(only, a)) and only.mean is not a.mean


@each_dtype
@each_layout
def test_normalize_each_chunk_equals_forward_on_the_whole(layout, dtype, rng):
    """y of each chunk normalized with the merged moments is that chunk of the whole batch's
    forward, and the running statistics move the same way."""
    shape, axis = layout.small, layout.axis
    x, _, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype)
    y, stats = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm.copy(),
                              running_var=rv.copy())
    _, _, _, rm_expected, rv_expected = reference.forward(x, gamma, beta, axis, True, rm, rv)
    chunks = _split(x, _sizes(shape[0], rng, 3))
    total = fastbn.merge_moments(*(fastbn.moments(p, axis=axis) for p in chunks))
    pieces = []
    for p in chunks:
        rm_p, rv_p = rm.copy(), rv.copy()
        y_p, stats_p = fastbn.normalize(p, total, gamma, beta, axis=axis, running_mean=rm_p,
                                        running_var=rv_p)
        assert y_p.shape == p.shape and y_p.dtype == dtype
        assert_close(stats_p.mean, stats.mean, 1e-12, "mean")
        assert_close(stats_p.invstd, stats.invstd, 1e-12, "invstd")
        assert_close(rm_p, rm_expected, 1e-12, "running_mean")
        assert_close(rv_p, rv_expected, 1e-12, "running_var")
        pieces.append(y_p)
    assert_close(np.concatenate(pieces, axis=0), y.astype(np.float64), tol_for(dtype), "y")


def test_normalize_in_place_and_into_out(rng):
    x = make_x(rng, (6, 3, 5), 1, np.float32)
    total = fastbn.moments(x)
    expected, _ = fastbn.normalize(x, total)
    out = np.empty_like(x)
    assert fastbn.normalize(x, total, out=out)[0] is out
    assert fastbn.normalize(x, total, out=x)[0] is x
    assert np.array_equal(out, expected) and np.array_equal(x, expected)


@pytest.mark.parametrize("bad,error,match", [
    ("no parts", TypeError, "at least one"),
    ("not moments", TypeError, r"parts\[1\] must be a Moments"),
    ("other C", ValueError, r"parts\[1\]\.count must have shape \(3,\)"),
    ("negative count", ValueError, r"parts\[1\]: count"),
    ("0-d mean", ValueError, r"parts\[0\]\.mean must be 1-D"),
])
def test_merge_errors(bad, error, match, rng):
    a = fastbn.moments(make_x(rng, (5, 3)))
    b = fastbn.moments(make_x(rng, (5, 4))) if bad == "other C" else fastbn.moments(
        make_x(rng, (5, 3)))
    if bad == "negative count":
        b = b._replace(count=-b.count)
    if bad == "0-d mean":
        a = fastbn.Moments(np.float64(5), np.float64(1), np.float64(2))
    args = {"no parts": (), "not moments": (a, 3.0)}.get(bad, (a, b))
    snap = Snapshot(**{f"{k}{i}": v for i, m in enumerate(args) if isinstance(m, tuple)
                       for k, v in zip("cmv", m)})
    with pytest.raises(error, match=match):
        fastbn.merge_moments(*args)
    snap.assert_unchanged()


def test_normalize_errors_leave_everything_unchanged(rng):
    x = make_x(rng, (5, 3), 1)
    rm, rv, out = np.zeros(3), np.ones(3), np.full((5, 3), 7.0)
    snap = Snapshot(x=x, rm=rm, rv=rv, out=out)
    good = fastbn.moments(x)
    for moments, error, match in [
            (fastbn.moments(make_x(rng, (5, 4))), ValueError, "moments.count"),
            (good._replace(count=np.ones(3)), ValueError, "more than one value"),
            ((good.count, good.mean), TypeError, "Moments"),
            (good._replace(m2=-good.m2), ValueError, "m2"),
            (good._replace(count=np.full(3, np.nan)), ValueError, "count must be finite")]:
        with pytest.raises(error, match=match):
            fastbn.normalize(x, moments, running_mean=rm, running_var=rv, out=out)
        snap.assert_unchanged()
    with pytest.raises(ValueError, match="eps"):
        fastbn.normalize(x, good, eps=0.0, running_mean=rm, running_var=rv, out=out)
    snap.assert_unchanged()
