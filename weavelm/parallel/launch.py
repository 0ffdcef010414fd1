"""Start N ranks on this host when no launcher (torchrun, accelerate) did.

`spawn(fn, nprocs, *args)` runs `fn(*args)` in N fresh processes with the same environment
variables torchrun would set, so `init_parallel` treats both alike. If any rank fails, the others
are stopped and the failure is raised here: a `WeavelmError` stays a `WeavelmError` (one line for
the CLI), anything else becomes a RuntimeError carrying the rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import traceback

import torch.multiprocessing as mp

from weavelm.errors import WeavelmError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, nprocs, port, fn, args, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    # N CPU ranks share this host's cores; oversubscription makes gloo runs crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        value = fn(*args)
        # Plain pickle copies tensor data; torch's queue pickler would share memory that dies
        # with this process.
        results.put((rank, "ok", pickle.dumps(value) if rank == 0 else None))
    except WeavelmError as e:
        results.put((rank, "user", str(e)))
    except BaseException:                                  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from weavelm.parallel.state import destroy_parallel
        try:
            destroy_parallel()
        except Exception:                                  # noqa: BLE001 - best effort at exit
            pass


def spawn(fn, nprocs: int, *args):
    """Run fn(*args) on ranks 0..nprocs-1; return rank 0's result. `fn` must be picklable."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, fn, args, results), daemon=False)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    value, failure, done = None, None, 0
    try:
        while done < nprocs:
            try:
                rank, kind, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and failure is None:
                    failure = ("error", f"rank {procs.index(dead[0])} died with exit code "
                                        f"{dead[0].exitcode}")
                if failure is not None:
                    break
                continue
            done += 1
            if kind == "ok":
                if rank == 0:
                    value = pickle.loads(payload)
            elif failure is None:
                failure = (kind, payload)
                break                                      # others may wait forever on that rank
    finally:
        for p in procs:
            p.join(timeout=5.0 if failure is None else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    if failure is not None:
        kind, payload = failure
        if kind == "user":
            raise WeavelmError(payload)
        raise RuntimeError(f"a rank failed:\n{payload}")
    return value


def run_ranks(fn, tp: int, *args):
    """`fn(*args)` on every rank: in this process when TP is 1 or a launcher (torchrun,
    accelerate launch: they set WORLD_SIZE) already started the ranks, else in `tp` spawned
    processes. Returns rank 0's result (None on other ranks)."""
    if tp == 1 or "WORLD_SIZE" in os.environ:
        return fn(*args)
    return spawn(fn, tp, *args)
