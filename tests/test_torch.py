"""Cross-check with PyTorch (CPU, float64) where it is installed."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastbn  # noqa: E402

from _util import (assert_close, each_mode, make_affine, make_running, make_x,  # noqa: E402
                   plain_or_affine)

CASES = [("NCHW", (4, 3, 7, 9), 1), ("NxD", (37, 11), 1), ("NHWC", (4, 6, 7, 5), -1),
         ("NCL", (5, 3, 29), 1)]


def _to_torch_layout(a, axis):
    """A torch tensor with the channel axis at 1 (permute for channels-last)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if axis in (-1, a.ndim - 1) and a.ndim > 2:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _from_torch_layout(t, axis, ndim):
    if axis in (-1, ndim - 1) and ndim > 2:
        t = t.permute(0, *range(2, ndim), 1)
    return t.detach().numpy()


@plain_or_affine
@each_mode
@pytest.mark.parametrize("name,shape,axis", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(name, shape, axis, training, affine, rng):
    c = shape[axis]
    x = make_x(rng, shape, axis, np.float64)
    dy = make_x(rng, shape, axis, np.float64)
    gamma, beta = make_affine(rng, c) if affine else (None, None)
    rm, rv = make_running(rng, c)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    momentum, eps = 0.2, 1e-4

    y, stats = fastbn.forward(x, gamma, beta, axis=axis, training=training, running_mean=rm,
                              running_var=rv, momentum=momentum, eps=eps)
    dx, dgamma, dbeta = fastbn.backward(dy, x, stats, gamma, axis=axis, training=training)

    tx = _to_torch_layout(x, axis).clone().requires_grad_(True)
    tg = torch.from_numpy(gamma if affine else np.ones(c)).clone().requires_grad_(True)
    tb = torch.from_numpy(beta if affine else np.zeros(c)).clone().requires_grad_(True)
    ty = F.batch_norm(tx, trm, trv, tg, tb, training=training, momentum=momentum, eps=eps)
    ty.backward(_to_torch_layout(dy, axis))

    assert_close(y, _from_torch_layout(ty, axis, x.ndim), 1e-10, "y")
    assert_close(rm, trm.numpy(), 1e-10, "running_mean")
    assert_close(rv, trv.numpy(), 1e-10, "running_var")
    assert_close(dx, _from_torch_layout(tx.grad, axis, x.ndim), 1e-10, "dx")
    assert_close(dgamma, tg.grad.numpy(), 1e-10, "dgamma")
    assert_close(dbeta, tb.grad.numpy(), 1e-10, "dbeta")


def test_torch_running_stats_over_steps(rng):
    c = 3
    rm, rv = np.zeros(c), np.ones(c)
    trm, trv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    for step in range(5):
        x = make_x(rng, (6, c, 5, 4), 1, offset=rng.uniform(-5, 5, c) * step)
        fastbn.forward(x, axis=1, running_mean=rm, running_var=rv, momentum=0.1)
        F.batch_norm(torch.from_numpy(x), trm, trv, training=True, momentum=0.1)
        assert_close(rm, trm.numpy(), 1e-10)
        assert_close(rv, trv.numpy(), 1e-10)
