"""Synchronized batch norm: what the communication costs next to the local compute.

    mpiexec -n 2 python bench/distributed.py [--dtype float32] [--repeat 10] [--quick]

Each benchmark shape of fastbn.cases is the global batch, cut along axis 0 into one slice per
rank. On every rank, for training forward and backward, it times (the minimum over the repeats,
all ranks released together by a barrier):

* local: single-process ``fastbn.forward``/``backward`` on the rank's slice (the compute alone,
  with the slice's own statistics);
* synced: ``fastbn.distributed.forward``/``backward`` on the slice (compute and exchange);
* exchange: the exchange alone, as synced sends it (one ``allgather`` of each rank's
  ``Moments`` or gradient sums, 3·C or 2·C + 1 numbers);

and checks first that the synced results equal single-process fastbn on the whole batch.
Rank 0 prints a markdown table (the slowest rank's time for each). Run it with ranks × threads
within the cores (``NUMBA_NUM_THREADS``), or the ranks compete for them.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import distributed
from fastbn.cases import LAYOUTS


def timed(comm, func, repeat):
    """The slowest rank's minimum time of ``func()`` over ``repeat`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        comm.Barrier()
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return comm.allreduce(best, op=MPI.MAX)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for layout in LAYOUTS:
        shapes = [layout.small] if args.quick else layout.bench
        for shape in shapes:
            axis = layout.axis
            rng = np.random.default_rng(0)
            x_all = rng.standard_normal(shape, np.float32).astype(args.dtype) + 3
            dy_all = rng.standard_normal(shape, np.float32).astype(args.dtype)
            start = [len(part) for part in np.array_split(np.arange(shape[0]), size)]
            lo = sum(start[:rank])
            x, dy = x_all[lo:lo + start[rank]], dy_all[lo:lo + start[rank]]
            # validate, then time
            y, stats = distributed.forward(x, axis=axis)
            dx, _, _ = distributed.backward(dy, x, stats, axis=axis)
            if rank == 0:
                y_all, stats_all = fastbn.forward(x_all, axis=axis)
                dx_all = fastbn.backward(dy_all, x_all, stats_all, axis=axis)[0]
                tol = 1e-4 if args.dtype == "float32" else 1e-10
                np.testing.assert_allclose(y, y_all[:len(y)], rtol=tol, atol=tol)
                np.testing.assert_allclose(dx, dx_all[:len(dx)], rtol=tol, atol=tol)
            del x_all, dy_all
            local_stats = fastbn.forward(x, axis=axis)[1]
            moments = fastbn.moments(x, axis=axis)
            layout_key = distributed._layout(x, axis % x.ndim)
            c = shape[axis]
            sums = (np.zeros(c), np.zeros(c), x.size // c)
            times = {
                ("train fwd", "local"): timed(comm, lambda: fastbn.forward(x, axis=axis),
                                              args.repeat),
                ("train fwd", "synced"): timed(comm, lambda: distributed.forward(x, axis=axis),
                                               args.repeat),
                ("train fwd", "exchange"): timed(
                    comm, lambda: distributed._exchange(comm, (layout_key, moments)), args.repeat),
                ("train bwd", "local"): timed(
                    comm, lambda: fastbn.backward(dy, x, local_stats, axis=axis), args.repeat),
                ("train bwd", "synced"): timed(
                    comm, lambda: distributed.backward(dy, x, stats, axis=axis), args.repeat),
                ("train bwd", "exchange"): timed(
                    comm, lambda: distributed._exchange(comm, (layout_key, sums)), args.repeat),
            }
            for op in ("train fwd", "train bwd"):
                local, synced, exchange = (times[op, k] for k in ("local", "synced", "exchange"))
                rows.append((op, layout.name, "x".join(map(str, shape)), local, synced, exchange))
    if rank == 0:
        print(f"{size} ranks, {args.dtype}, {MPI.Get_library_version().splitlines()[0]}; "
              f"min of {args.repeat}, slowest rank\n")
        print("| op | layout | global shape | local ms | synced ms | exchange ms | "
              "exchange ÷ local | synced ÷ local |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for op, name, shape, local, synced, exchange in rows:
            print(f"| {op} | {name} | {shape} | {local * 1e3:.3g} | {synced * 1e3:.3g} | "
                  f"{exchange * 1e3:.3g} | {exchange / local:.1%} | {synced / local:.2f} |")


if __name__ == "__main__":
    main()
