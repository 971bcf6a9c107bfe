"""Results of calls without ``out=`` reuse the memory of dropped results (fastbn._outputs), and
never memory that a live result, or a view of one, still uses."""
import os
import threading
import weakref

import numpy as np
import pytest

import fastbn
from fastbn import _outputs

import reference
from _util import assert_close, make_case, run_python, tol_for


@pytest.fixture
def cache(monkeypatch):
    """An empty output cache that takes arrays of every size (MIN_BYTES = 0)."""
    monkeypatch.setattr(_outputs, "MIN_BYTES", 0)
    monkeypatch.setattr(_outputs, "LIMIT", 1 << 30)
    _outputs.release()
    yield _outputs
    _outputs.release()


def _bases(*arrays):
    return [a.base for a in arrays]


def test_a_dropped_result_is_reused_and_a_live_one_is_not(cache, rng):
    x, dy, gamma, beta, _, _ = make_case(rng, (16, 8, 5, 5), 1, np.float32)
    y, stats = fastbn.forward(x, gamma, beta)
    assert y.base is not None and cache.cached_bytes() == (y.nbytes, 0)
    first = weakref.ref(y.base)  # a reference that does not keep the buffer in use
    view = y[3:, 2]  # a view keeps the buffer in use after y is dropped
    kept = view.copy()
    del y
    y2, _ = fastbn.forward(x, gamma, beta)
    dx, _, _ = fastbn.backward(dy, x, stats, gamma)
    assert y2.base is not first() and dx.base is not first()
    assert not np.shares_memory(view, y2) and not np.shares_memory(view, dx)
    assert not np.shares_memory(y2, dx)
    np.testing.assert_array_equal(view, kept)  # the view's data was not written
    del view, y2
    y3, _ = fastbn.forward(x, gamma, beta)  # now the first buffer is idle: reused
    assert y3.base is first()  # the least recently used idle buffer of its size
    assert cache.cached_bytes()[0] == y3.nbytes + dx.nbytes


@pytest.mark.parametrize("training", [True, False])
def test_results_from_the_cache_are_right(cache, rng, training):
    x, dy, gamma, beta, rm, rv = make_case(rng, (9, 4, 6, 7), 1, np.float64)
    for _ in range(3):  # the second and third calls get the first calls' buffers
        y, stats = fastbn.forward(x, gamma, beta, training=training, running_mean=rm.copy(),
                                  running_var=rv.copy())
        dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, training=training)
        ry, rmean, rinvstd, _, _ = reference.forward(x, gamma, beta, 1, training, rm, rv)
        rdx, rdgamma, rdbeta = reference.backward(dy, x, rmean, rinvstd, gamma, 1, training)
        assert_close(y, ry, tol_for(np.float64), "y")
        assert_close(dx, rdx, tol_for(np.float64), "dx")
        assert_close(dgamma, rdgamma, tol_for(np.float64), "dgamma")
        assert_close(dbeta, rdbeta, tol_for(np.float64), "dbeta")
        assert y.flags.c_contiguous and y.flags.writeable and dx.flags.c_contiguous
        del y, dx


def test_results_in_another_memory_order_use_the_cache_too(cache, rng):
    x, _, gamma, beta, _, _ = make_case(rng, (6, 5, 4, 3), 1, np.float64)
    xt = np.asfortranarray(x)  # viewed in its memory order: the result has it too
    y, _ = fastbn.forward(xt, gamma, beta)
    assert y.flags.f_contiguous and y.base is not None
    ry, _, _, _, _ = reference.forward(x, gamma, beta, 1)
    assert_close(y, ry, tol_for(np.float64), "y")


def test_idle_buffers_are_dropped_beyond_the_limit(cache, monkeypatch, rng):
    x = rng.standard_normal((64, 32))
    monkeypatch.setattr(_outputs, "LIMIT", 2 * x.nbytes)
    results = [fastbn.forward(x + k)[0] for k in range(5)]  # five buffers in use at once
    assert cache.cached_bytes() == (5 * x.nbytes, 0)
    del results
    y, _ = fastbn.forward(x)  # reuses one buffer; the idle ones beyond the limit are dropped
    in_use, idle = cache.cached_bytes()
    assert in_use == x.nbytes and idle <= 2 * x.nbytes
    del y
    cache.release()
    assert cache.cached_bytes() == (0, 0)


def test_no_cache_below_min_bytes_or_with_limit_zero(monkeypatch, rng):
    x = rng.standard_normal((8, 3))
    y, _ = fastbn.forward(x)
    assert y.flags.owndata  # 192 bytes: below MIN_BYTES
    monkeypatch.setattr(_outputs, "MIN_BYTES", 0)
    monkeypatch.setattr(_outputs, "LIMIT", 0)
    y, _ = fastbn.forward(x)
    assert y.flags.owndata


def test_threads_get_their_own_buffers(cache, rng):
    """Calls from many threads at once: every live result has memory of its own."""
    x, _, gamma, beta, _, _ = make_case(rng, (32, 6, 9), 1, np.float64)
    expected, _, _, _, _ = reference.forward(x, gamma, beta, 1)
    results, errors = [], []
    lock = threading.Lock()

    def work():
        try:
            mine = [fastbn.forward(x, gamma, beta)[0] for _ in range(20)]
            with lock:
                results.extend(mine[-3:])
        except Exception as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, a in enumerate(results):
        assert_close(a, expected, tol_for(np.float64), "y")
        assert not any(np.shares_memory(a, b) for b in results[k + 1:])


def test_environment_variable_sets_the_limit():
    code = ("import fastbn._outputs as o, numpy as np; "
            "print(o.LIMIT, o.empty((o.MIN_BYTES // 8, 2), np.float32).flags.owndata)")
    proc = run_python("-c", code, env={"FASTBN_OUTPUT_CACHE": "0"})
    assert proc.stdout.split() == ["0", "True"]
    proc = run_python("-c", code, env={"FASTBN_OUTPUT_CACHE": "12345"})
    assert proc.stdout.split() == ["12345", "False"]
    proc = run_python("-c", code, env={"FASTBN_OUTPUT_CACHE": "lots"}, check=False)
    assert proc.returncode != 0 and "FASTBN_OUTPUT_CACHE must be a number of bytes" in proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_allocates(cache, rng):
    x = rng.standard_normal((40, 7))
    fastbn.forward(x)
    pid = os.fork()
    if pid == 0:  # the child: a call must work (the cache's lock is new) and be right
        try:
            y, _ = fastbn.forward(x)
            ry, _, _, _, _ = reference.forward(x, None, None, 1)
            os._exit(0 if np.allclose(y, ry, rtol=1e-12, atol=1e-12) else 1)
        except BaseException:  # noqa: BLE001 -- the child must exit, whatever went wrong
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
