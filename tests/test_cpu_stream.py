"""``stream=`` is for the GPU: a CPU call ignores it (so code that passes it runs on either
device), whatever it is, and computes what the call without it computes."""
import numpy as np
import pytest
from _util import make_case

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
