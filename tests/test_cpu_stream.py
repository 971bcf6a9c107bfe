"""``stream=`` is for the GPU: a CPU call ignores it (so code that passes it runs on either
device), whatever it is, and computes what the call without it computes."""
import numpy as np
import pytest
import reference
from _util import assert_close, make_case

import fastbn


@pytest.mark.parametrize("stream", [7, object(), "not a stream"], ids=["int", "object", "str"])
def test_a_cpu_call_ignores_the_stream(stream, rng):
    x, dy, gamma, beta, rm, rv = make_case(rng, (6, 3, 5), 1, np.float32)
    y, stats = fastbn.forward(x, gamma, beta, running_mean=rm.copy(), running_var=rv.copy())
    ys, statss = fastbn.forward(x, gamma, beta, running_mean=rm.copy(), running_var=rv.copy(),
                                stream=stream)
    assert ys.tobytes() == y.tobytes() and statss.invstd.tobytes() == stats.invstd.tobytes()
    grads = fastbn.backward(dy, x, stats, gamma)
    for a, b in zip(fastbn.backward(dy, x, stats, gamma, stream=stream), grads):
        assert a.tobytes() == b.tobytes()
    total = fastbn.moments(x, stream=stream)
    assert total.m2.tobytes() == fastbn.moments(x).m2.tobytes()
    yn = fastbn.normalize(x, total, gamma, beta, stream=stream)[0]
    assert yn.tobytes() == fastbn.normalize(x, total, gamma, beta)[0].tobytes()
    layer = fastbn.BatchNorm(3, stream=stream)
    assert layer(x).tobytes() == fastbn.BatchNorm(3)(x).tobytes()


@pytest.mark.parametrize("stream", [7, object()], ids=["int", "object"])
def test_a_cpu_call_off_the_lean_path_ignores_the_stream(stream, rng, monkeypatch):
    """A strided x and list parameters (which the lean path does not take) with stream=: the
    full checks see the stream, and the results are the reference's."""
    import fastbn._batchnorm as api
    seen = []

    def noting(check):
        def checked(*args, **kwargs):
            seen.append(kwargs["stream"] if "stream" in kwargs else args[-1])
            return check(*args, **kwargs)
        return checked

    for name in ("check_forward", "check_backward"):
        monkeypatch.setattr(api, name, noting(getattr(api, name)))
    x, dy, gamma, beta, rm, rv = make_case(rng, (6, 6, 5), 1, np.float64)
    xs, dys = x[:, ::2], dy[:, ::2]
    rms, rvs = rm[::2].copy(), rv[::2].copy()
    y, stats = fastbn.forward(xs, list(gamma[::2]), list(beta[::2]), running_mean=rms,
                              running_var=rvs, stream=stream)
    ry, rmean, rinvstd, rrm, rrv = reference.forward(xs, gamma[::2], beta[::2], 1, True, rm[::2],
                                                     rv[::2])
    assert_close(y, ry, 1e-10, "y")
    assert_close(stats.invstd, rinvstd, 1e-10, "invstd")
    assert_close(rms, rrm, 1e-10, "running_mean")
    assert_close(rvs, rrv, 1e-10, "running_var")
    dx, dgamma, dbeta = fastbn.backward(dys, xs, stats, list(gamma[::2]), stream=stream)
    rdx, rdgamma, rdbeta = reference.backward(dys, xs, rmean, rinvstd, gamma[::2], 1, True)
    assert_close(dx, rdx, 1e-10, "dx")
    assert_close(dgamma, rdgamma, 1e-10, "dgamma")
    assert_close(dbeta, rdbeta, 1e-10, "dbeta")
    assert seen == [stream, stream], "both calls took the full path, with the stream"
