"""out=: a new array, the input itself (in place), and non-contiguous views of bigger arrays."""
import numpy as np

import fastbn

from _util import each_dtype, each_layout, each_mode, make_affine, make_running, make_x


def _strided_out(shape, dtype, axis):
    """A non-contiguous view of a bigger array filled with a sentinel, and that array."""
    big_shape = list(shape)
    big_shape[0] = 2 * shape[0]
    big_shape[-1] = shape[-1] + 3
    big = np.full(big_shape, -123.0, dtype=dtype)
    view = big[::2, ..., 1:1 + shape[-1]]
    assert view.shape == tuple(shape) and not view.flags.c_contiguous
    return view, big


def _outside_untouched(big, view):
    mask = np.ones(big.shape, bool)
    mask[::2, ..., 1:1 + view.shape[-1]] = False
    return np.all(big[mask] == -123.0)


@each_mode
@each_dtype
@each_layout
def test_forward_out(layout, dtype, training, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_affine(rng, c)
    rm, rv = make_running(rng, c)

    def call(xx, **kw):
        r_m, r_v = rm.copy(), rv.copy()
        y, s = fastbn.forward(xx, gamma, beta, axis=axis, training=training,
                              running_mean=r_m, running_var=r_v, **kw)
        return y, s, r_m, r_v

    y0, s0, rm0, rv0 = call(x.copy())

    def same(res):
        y, s, r_m, r_v = res
        assert np.array_equal(y, y0)
        assert np.array_equal(s.mean, s0.mean) and np.array_equal(s.invstd, s0.invstd)
        assert np.array_equal(r_m, rm0) and np.array_equal(r_v, rv0)

    out = np.empty_like(x)
    res = call(x, out=out)
    assert res[0] is out
    same(res)

    xi = x.copy()
    res = call(xi, out=xi)
    assert res[0] is xi
    same(res)

    out, big = _strided_out(shape, dtype, axis)
    res = call(x, out=out)
    assert res[0] is out
    same(res)
    assert _outside_untouched(big, out)

    # in place on a non-contiguous input
    xs, big = _strided_out(shape, dtype, axis)
    xs[...] = x
    res = call(xs, out=xs)
    assert res[0] is xs
    same(res)
    assert _outside_untouched(big, xs)

    # Fortran-ordered out
    out = np.asfortranarray(np.empty_like(x))
    res = call(x, out=out)
    assert res[0] is out
    same(res)


@each_mode
@each_dtype
@each_layout
def test_backward_out(layout, dtype, training, rng):
    shape, axis = layout.small, layout.axis
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype)
    gamma = make_affine(rng, c)[0]
    _, stats = fastbn.forward(x, gamma, axis=axis)
    ref = fastbn.backward(dy.copy(), x.copy(), stats, gamma, axis=axis, training=training)

    def same(res, out):
        assert res[0] is out
        for a, b in zip(res, ref):
            assert np.array_equal(a, b)

    out = np.empty_like(x)
    same(fastbn.backward(dy, x, stats, gamma, axis=axis, training=training, out=out), out)

    dyi = dy.copy()
    same(fastbn.backward(dyi, x, stats, gamma, axis=axis, training=training, out=dyi), dyi)

    xi = x.copy()
    same(fastbn.backward(dy, xi, stats, gamma, axis=axis, training=training, out=xi), xi)

    out, big = _strided_out(shape, dtype, axis)
    same(fastbn.backward(dy, x, stats, gamma, axis=axis, training=training, out=out), out)
    assert _outside_untouched(big, out)

    # in place on a non-contiguous dy
    dys, big = _strided_out(shape, dtype, axis)
    dys[...] = dy
    same(fastbn.backward(dys, x, stats, gamma, axis=axis, training=training, out=dys), dys)
    assert _outside_untouched(big, dys)
