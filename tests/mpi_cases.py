"""fastbn.distributed on every rank, run by tests/test_distributed.py as
``mpiexec -n P python -m mpi4py tests/mpi_cases.py [--gpu]``.

Every rank builds the same global batch from one seed and takes its slice (uneven sizes, and an
empty slice with 3 or more ranks). Each check compares the synchronized result with
single-process fastbn on the whole batch and with the float64 reference. A failing rank prints
its traceback and aborts the job, so that no rank is left waiting.
"""
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastbn  # noqa: E402
from fastbn import distributed  # noqa: E402

from fastbn.cases import host, on_device  # noqa: E402

import reference  # noqa: E402
from _util import assert_close, make_case  # noqa: E402

# --gpu: the slices are CUDA arrays (on the GPU, or under Numba's CUDA simulator where
# NUMBA_ENABLE_CUDASIM=1), and only the checks that take them run.
GPU = "--gpu" in sys.argv[1:]

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SPLITS = {2: [[3, 8], [1, 1], [0, 6]], 3: [[5, 0, 9], [0, 4, 1]]}[size]
LAYOUTS = [((None, 6), 1), ((None, 4, 3, 5), 1), ((None, 3, 5, 4), -1), ((None, 2, 7), 1)]
checks = []


def check(func=None, gpu=False):
    """Register a check; ``gpu=True``: it runs with --gpu too, with CUDA arrays."""
    def register(func):
        if gpu or not GPU:
            checks.append(func)
        return func
    return register(func) if func else register


def mine_on_device(a):
    """``a`` on the GPU with --gpu, else as it is."""
    return on_device(a)[0] if GPU else a


def my_slice(a, sizes):
    start = sum(sizes[:rank])
    return a[start:start + sizes[rank]]


def same_everywhere(*arrays):
    """The arrays hold the same bits on every rank."""
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    assert all(b == mine for b in comm.allgather(mine)), "ranks got different bits"


def summed(a):
    return comm.allreduce(np.asarray(a, np.float64), op=MPI.SUM)


def global_case(shape, axis, sizes, dtype=np.float64, seed=0):
    shape = (sum(sizes),) + shape[1:]
    return make_case(np.random.default_rng(seed), shape, axis, dtype)


@check(gpu=True)
def forward_and_backward_equal_the_concatenated_batch():
    for sizes in SPLITS:
        for shape, axis in LAYOUTS[:2] if GPU else LAYOUTS:  # the simulator is slow
            x, dy, gamma, beta, rm, rv = global_case(shape, axis, sizes)
            ry, rmean, rinvstd, rrm, rrv = reference.forward(x, gamma, beta, axis, True, rm, rv)
            rdx, rdg, rdb = reference.backward(dy, x, rmean, rinvstd, gamma, axis)
            rm_full, rv_full = rm.copy(), rv.copy()
            y_full, st_full = fastbn.forward(x, gamma, beta, axis=axis, running_mean=rm_full,
                                             running_var=rv_full)
            dx_full, dg_full, db_full = fastbn.backward(dy, x, st_full, gamma, axis=axis)

            mine_rm, mine_rv = rm.copy(), rv.copy()
            if GPU and sizes is SPLITS[-1]:  # running statistics on the device, updated there
                mine_rm, mine_rv = on_device(mine_rm, mine_rv)
            x_mine = mine_on_device(my_slice(x, sizes))
            y, st = distributed.forward(x_mine, gamma, beta, axis=axis, running_mean=mine_rm,
                                        running_var=mine_rv)
            dy_mine = mine_on_device(my_slice(dy, sizes))
            dx, dg, db = distributed.backward(dy_mine, x_mine, st, gamma, axis=axis)
            y, dx, dg, db = host(y), host(dx), host(dg), host(db)
            st = fastbn.BatchStats(host(st.mean), host(st.invstd))
            mine_rm, mine_rv = host(mine_rm), host(mine_rv)
            where = f"sizes {sizes}, shape {x.shape}, axis {axis}"
            for got, single, ref, name in [
                    (y, my_slice(y_full, sizes), my_slice(ry, sizes), "y"),
                    (st.mean, st_full.mean, rmean, "mean"),
                    (st.invstd, st_full.invstd, rinvstd, "invstd"),
                    (mine_rm, rm_full, rrm, "running_mean"), (mine_rv, rv_full, rrv, "running_var"),
                    (dx, my_slice(dx_full, sizes), my_slice(rdx, sizes), "dx"),
                    (summed(dg), dg_full, rdg, "dgamma (summed over ranks)"),
                    (summed(db), db_full, rdb, "dbeta (summed over ranks)")]:
                assert_close(got, single, 1e-10, f"{name} vs single process, {where}")
                assert_close(got, ref, 1e-10, f"{name} vs reference, {where}")
            same_everywhere(st.mean, st.invstd, mine_rm, mine_rv)


@check(gpu=True)
def fused_residual_and_relu_equal_the_concatenated_batch():
    """relu(BN(x) + residual) and its backward (mask, dresidual), training and eval, and the
    SyncBatchNorm layer with activation="relu": single-process fastbn's results on the whole
    batch."""
    sizes = SPLITS[0]
    x, dy, gamma, beta, rm, rv = global_case((None, 4, 3, 5), 1, sizes, seed=3)
    residual = global_case((None, 4, 3, 5), 1, sizes, seed=4)[0]
    mine = {name: mine_on_device(my_slice(a, sizes)) for name, a in
            (("x", x), ("dy", dy), ("residual", residual))}
    for training in (True, False):
        running = {} if training else dict(running_mean=rm, running_var=rv)
        y_full, st_full = fastbn.forward(x, gamma, beta, training=training, residual=residual,
                                         activation="relu", **running)
        dres_full = np.empty_like(dy)
        dx_full, dg_full, db_full = fastbn.backward(dy, x, st_full, gamma, training=training,
                                                    activation="relu", y=y_full,
                                                    dresidual=dres_full)
        y, st = distributed.forward(mine["x"], gamma, beta, training=training,
                                    residual=mine["residual"], activation="relu", **running)
        dres = mine_on_device(np.empty_like(my_slice(dy, sizes)))
        dx, dg, db = distributed.backward(mine["dy"], mine["x"], st, gamma, training=training,
                                          activation="relu", y=y, dresidual=dres)
        where = f"training={training}"
        for got, single, name in [(host(y), my_slice(y_full, sizes), "y"),
                                  (host(dx), my_slice(dx_full, sizes), "dx"),
                                  (host(dres), my_slice(dres_full, sizes), "dresidual"),
                                  (summed(host(dg)), dg_full, "dgamma"),
                                  (summed(host(db)), db_full, "dbeta")]:
            assert_close(got, single, 1e-10, f"fused {name}, {where}")
    if GPU:
        return
    single = fastbn.BatchNorm(4, activation="relu", dtype=np.float64)
    synced = distributed.SyncBatchNorm(4, activation="relu", dtype=np.float64)
    y_full = single(x, residual)
    dx_full, dres_full = single.backward(dy)
    y = synced(my_slice(x, sizes), my_slice(residual, sizes))
    dx, dres = synced.backward(my_slice(dy, sizes))
    for got, single_value, name in [(y, y_full, "y"), (dx, dx_full, "dx"),
                                    (dres, dres_full, "dresidual")]:
        assert_close(got, my_slice(single_value, sizes), 1e-10, f"fused layer {name}")


@check
def float32_in_place_and_eval():
    sizes = SPLITS[0]
    x, dy, gamma, beta, rm, rv = global_case((None, 5, 8), 1, sizes, np.float32, seed=1)
    y_full, st_full = fastbn.forward(x, gamma, beta)
    mine = my_slice(x, sizes).copy()
    y, st = distributed.forward(mine, gamma, beta, out=mine)
    assert y is mine
    assert_close(y, my_slice(y_full, sizes), 1e-5, "float32 y")
    assert_close(st.invstd, st_full.invstd, 1e-12, "float32 invstd")
    # eval: running statistics, no exchange: the same as single process on the slice
    y_eval, _ = distributed.forward(my_slice(x, sizes), gamma, beta, training=False,
                                    running_mean=rm, running_var=rv)
    expected, _ = fastbn.forward(my_slice(x, sizes), gamma, beta, training=False,
                                 running_mean=rm, running_var=rv)
    assert np.array_equal(y_eval, expected)


@check
def sync_layer_equals_one_layer_on_the_whole_batch():
    for momentum in (0.1, None):
        sizes = SPLITS[0]
        single = fastbn.BatchNorm(4, momentum=momentum, dtype=np.float64)
        synced = distributed.SyncBatchNorm(4, momentum=momentum, dtype=np.float64)
        for step in range(3):
            x, dy, _, _, _, _ = global_case((None, 4, 6), 1, sizes, seed=10 + step)
            y_full = single(x)
            dx_full = single.backward(dy)
            y = synced(my_slice(x, sizes))
            dx = synced.backward(my_slice(dy, sizes))
            assert_close(y, my_slice(y_full, sizes), 1e-10, "layer y")
            assert_close(dx, my_slice(dx_full, sizes), 1e-10, "layer dx")
            for name, g in synced.grads().items():
                assert_close(summed(g), single.grads()[name], 1e-10, f"layer d{name}")
            for key, value in single.state_dict().items():
                assert_close(synced.state_dict()[key], value, 1e-10, key)
            lr = 0.1
            for layer in (single, synced):  # a step of SGD, on the summed gradients
                grads = {k: summed(g) if layer is synced else g for k, g in layer.grads().items()}
                for k, p in layer.params().items():
                    p -= lr * grads[k]
        synced.eval()
        x = global_case((None, 4, 6), 1, sizes, seed=99)[0]
        assert_close(synced(my_slice(x, sizes)), my_slice(single.eval()(x), sizes), 1e-10,
                     "eval after training")


@check
def convert_swaps_batchnorm_layers_in_a_model():
    class Net:
        def __init__(self):
            self.blocks = [fastbn.BatchNorm(3), {"bn": fastbn.BatchNorm2d(5), "w": np.ones(2)}]
            self.head = fastbn.BatchNorm1d(2)

        def __call__(self, x):
            return x

    net = Net()
    gamma = net.head.gamma
    same = distributed.SyncBatchNorm.convert(net)
    assert same is net
    layers = [net.blocks[0], net.blocks[1]["bn"], net.head]
    assert all(isinstance(layer, distributed.SyncBatchNorm) for layer in layers)
    assert net.head.gamma is gamma, "the converted layer shares the arrays"
    assert isinstance(distributed.SyncBatchNorm.convert(fastbn.BatchNorm(3)),
                      distributed.SyncBatchNorm)


def expect_error(error, text, call):
    try:
        call()
    except error as e:
        assert text in str(e), f"{text!r} not in {str(e)!r}"
        return str(e)
    raise AssertionError(f"no {error.__name__} ({text})")


@check
def disagreeing_ranks_raise_everywhere():
    rng = np.random.default_rng(rank)
    c = 3 if rank == 0 else 4
    expect_error(ValueError, "disagree on x's channel count C",
                 lambda: distributed.forward(rng.standard_normal((4, c))))
    dtype = np.float32 if rank == 0 else np.float64
    expect_error(ValueError, "disagree on x's dtype",
                 lambda: distributed.forward(rng.standard_normal((4, 3)).astype(dtype)))
    axis = 1 if rank == 0 else 2
    expect_error(ValueError, "disagree on x's channel axis",
                 lambda: distributed.forward(rng.standard_normal((4, 3, 3)), axis=axis))
    x = rng.standard_normal((4, 3))
    _, stats = distributed.forward(x)
    expect_error(ValueError, "disagree on x's channel count C",
                 lambda: distributed.backward(np.ones((4, c)), rng.standard_normal((4, c)),
                                              fastbn.BatchStats(np.zeros(c), np.ones(c))))
    # after the errors, the ranks are still in step
    y, again = distributed.forward(x)
    assert_close(again.mean, stats.mean, 0, "a good call after the errors")


@check
def a_bad_argument_on_one_rank_raises_on_every_rank():
    x = np.random.default_rng(rank).standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    gamma = np.ones(4 if rank == size - 1 else 3)
    if rank == size - 1:
        expect_error(ValueError, "gamma must have shape (3,)",
                     lambda: distributed.forward(x, gamma, running_mean=rm, running_var=rv))
    else:
        expect_error(ValueError, f"rank {size - 1} of {size} raised ValueError: gamma",
                     lambda: distributed.forward(x, gamma, running_mean=rm, running_var=rv))
    assert not rm.any() and np.all(rv == 1), "running statistics untouched"
    dy = np.ones((4, 3), np.float32 if rank == 0 else np.float64)
    stats = distributed.forward(x)[1]
    expect_error(TypeError, "dy", lambda: distributed.backward(dy, x, stats))
    # not a TypeError or ValueError: CUDA is switched off here (NUMBA_DISABLE_CUDA=1, set by
    # tests/test_distributed.py) for rank 0's device="cuda"
    device = "cuda" if rank == 0 else None
    expect_error(RuntimeError, "CUDA" if rank == 0 else "rank 0 of",
                 lambda: distributed.forward(x, device=device))
    flag = "yes" if rank == 0 else True  # not a bool
    expect_error(TypeError, "training", lambda: distributed.forward(x, training=flag))
    expect_error(TypeError, "training", lambda: distributed.backward(x, x, stats, training=flag))


@check
def a_global_batch_of_one_value_per_channel_is_refused():
    x = np.ones((1 if rank == 0 else 0, 3))
    expect_error(ValueError, f"the global batch over {size} ranks has 1",
                 lambda: distributed.forward(x))


failures = 0
for func in checks:
    try:
        func()
    except Exception:
        print(f"rank {rank}: {func.__name__} FAILED\n{traceback.format_exc()}", flush=True)
        comm.Abort(1)
print(f"rank {rank} of {size}: {len(checks)} checks passed", flush=True)
