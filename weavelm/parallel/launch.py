"""Start N ranks on this host when no launcher (torchrun, accelerate) did.

`spawn(fn, nprocs, *args)` runs `fn(*args)` in N fresh processes with the same environment
variables torchrun would set, so `init_parallel` treats both alike. Each rank reports through its
own pipe; the parent watches the pipes and the processes together, so it learns at once when a
rank dies. Failures come back as one line, the cause first:

- a rank killed by a signal: "rank 1 died (signal 9, SIGKILL)" (the others' collective errors
  that follow are its consequence and are not shown);
- a `WeavelmError` on a rank stays a `WeavelmError`;
- a rank that stops answering (stopped, stuck) makes the others' collectives time out after the
  collective timeout (`init_parallel`); the parent names the silent rank;
- anything else (a bug) becomes a RuntimeError carrying the rank's traceback.

Once one rank has failed, the parent stops the rest (SIGTERM, then SIGKILL after a grace).
Ranks never outlive the parent: they ask the kernel for SIGKILL when it dies (Linux
`PR_SET_PDEATHSIG`) and also watch their parent id, and they leave Ctrl-C to the parent. SIGTERM
to the parent is handled like Ctrl-C while the ranks run.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

from weavelm.errors import WeavelmError, raise_terminated

STORE_ENV = "WEAVELM_RENDEZVOUS_FILE"   # set by `spawn`: the ranks' rendezvous file (a FileStore)
REPORT_GRACE_S = 1.0   # after the first failure: how long the other ranks get to report
FINISH_GRACE_S = 5.0   # after rank 0's result: how long the others get to exit
STOP_GRACE_S = 2.0     # between SIGTERM and SIGKILL when stopping ranks
# Words of gloo / NCCL / store errors that mean "a peer went away or never answered".
PEER_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
               "timed out", "broken pipe", "socket closed", "read error")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads(nprocs: int) -> int:
    """torch threads for each of `nprocs` ranks on this host: the cores this process may run
    on, less those other work keeps busy (the 1-minute load average), shared among the ranks;
    at least one. An OpenMP thread waiting for a core that another process holds stalls every
    operation of its rank: on a busy 2-core machine decode ran 3-7x slower with two threads
    than with one."""
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy) // nprocs)


def set_cpu_threads(nprocs: int) -> None:
    """Give this rank `cpu_threads(nprocs)` torch threads, unless OMP_NUM_THREADS says how many."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch
    torch.set_num_threads(cpu_threads(nprocs))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int, rank: int) -> None:
    """SIGKILL this rank when the parent dies, however it dies; name it `weavelm-rankN` in ps."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)                  # PR_SET_PDEATHSIG
            libc.prctl(15, f"weavelm-rank{rank}".encode(), 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:                  # it died before the request took effect
        os._exit(1)

    def watch():                                    # other systems, or a lost signal
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="weavelm-parent-watch", daemon=True).start()


def peer_failure(exc: BaseException) -> str | None:
    """The first line of a collective's error when a peer vanished or timed out, else None."""
    import re

    import torch.distributed as dist
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, getattr(dist, "DistError", ())) or any(w in text.lower()
                                                               for w in PEER_ERRORS):
        return re.sub(r"^\[[^\]]*\]\s*", "", first)[:200]     # drop gloo's [file.cc:line]
    return None


def _worker(rank, nprocs, store, parent_pid, fn, args, conn):
    _die_with_parent(parent_pid, rank)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C: the parent stops every rank
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), **{STORE_ENV: store})
    # Ranks of one host talk over loopback only: gloo's and NCCL's sockets bind there (the
    # rendezvous is a file, `init_parallel`), so nothing listens on other interfaces unless
    # the user names one.
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, "lo")
    try:           # tqdm's default lock is a semaphore that a killed rank would leave behind
        from tqdm import tqdm
        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    # N ranks share the cores this process may run on (its affinity, not the host's count);
    # oversubscription makes gloo runs crawl.
    set_cpu_threads(nprocs)
    try:
        value = fn(*args)
        # Plain pickle copies tensor data; torch's pickler would share memory that dies with
        # this process.
        report = ("ok", pickle.dumps(value) if rank == 0 else None)
    except WeavelmError as e:
        report = ("user", str(e))
    except BaseException as e:                             # noqa: BLE001 - reported to the parent
        peer = peer_failure(e)
        report = ("peer", peer) if peer else ("error", traceback.format_exc())
    try:
        from weavelm.parallel.state import _STATE
        timeout = _STATE.timeout_s if _STATE is not None else None
        conn.send_bytes(pickle.dumps(report + (timeout,)))
    finally:
        if report[0] == "peer":
            # A peer is gone or stuck: tearing the group down would wait on it, and gloo's
            # threads then abort the process with "terminate called..." on stderr. The report
            # is sent; leave without destructors.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        from weavelm.parallel.state import destroy_parallel
        try:
            destroy_parallel()
        except Exception:                                  # noqa: BLE001 - best effort at exit
            pass


def _signal_name(number: int) -> str:
    try:
        return f"signal {number}, {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"


def _proc_state(pid: int) -> str:
    """The kernel's one-letter state of `pid` (R, S, D, T = stopped, Z, ...); '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _failure(procs, reports) -> BaseException | None:
    """The one error that explains what went wrong, the cause before its consequences."""
    for r, p in enumerate(procs):
        if r not in reports and p.exitcode is not None and p.exitcode < 0:
            return WeavelmError(
                f"rank {r} died ({_signal_name(-p.exitcode)}); the other ranks were stopped: "
                f"if nobody sent that signal, look for the out-of-memory killer (dmesg) and "
                f"lower --tp or the model size")
    user = [rep[1] for r, rep in sorted(reports.items()) if rep[0] == "user"]
    if user:
        return WeavelmError(user[0])
    for r, p in enumerate(procs):
        if r not in reports and p.exitcode not in (None, 0):
            return WeavelmError(f"rank {r} exited with code {p.exitcode} without a report; "
                                f"the other ranks were stopped: see its output above")
    errors = [rep[1] for r, rep in sorted(reports.items()) if rep[0] == "error"]
    if errors:
        return RuntimeError(f"a rank failed:\n{errors[0]}")
    peers = [(r, rep) for r, rep in sorted(reports.items()) if rep[0] == "peer"]
    if not peers:
        return None
    silent = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is None]
    r0, (_, line, timeout) = peers[0]
    limit = f"the {timeout:g} s collective timeout" if timeout else "the collective timeout"
    # (a rank stuck waiting on the stopped one is silent too: name the stopped one)
    stopped = [r for r in silent if _proc_state(procs[r].pid) == "T"]
    if stopped:
        return WeavelmError(f"rank {stopped[0]} is stopped (SIGSTOP or a debugger) and the others "
                            f"gave up waiting for it after {limit}: all ranks were ended; do not "
                            f"stop a rank while it runs")
    if silent:
        r = silent[0]
        return WeavelmError(f"rank {r} stopped answering and the others gave up after {limit}: "
                            f"all ranks were ended; if it was only slow, raise "
                            f"--collective-timeout (or WEAVELM_COLLECTIVE_TIMEOUT)")
    return WeavelmError(f"rank {r0}: a collective failed ({line}); all ranks were ended: if a "
                        f"rank was only slow, raise --collective-timeout (or "
                        f"WEAVELM_COLLECTIVE_TIMEOUT)")


def _stop(procs, finished: bool) -> None:
    """SIGTERM every live rank, SIGKILL those still there after STOP_GRACE_S; reap them all.
    `finished`: every rank reported, so give them FINISH_GRACE_S to exit on their own first."""
    deadline = time.monotonic() + FINISH_GRACE_S
    for p in procs if finished else ():
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            if _proc_state(p.pid) == "T":           # stopped: SIGTERM would wait for SIGCONT
                p.kill()
            else:
                p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()                                # also ends a stopped (SIGSTOP) rank
            p.join()


def _collect(procs, conns, reports) -> None:
    """Wait for every rank's report or exit; after the first failure (or rank 0's result) wait
    only a grace period for the rest."""
    open_conns = dict(enumerate(conns))
    deadline = None
    while len(reports) < len(procs):
        alive = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is None]
        if not alive and not open_conns:
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(list(open_conns.values()) + [procs[r].sentinel for r in alive], timeout)
        if not ready:
            return                                  # grace over: the rest are stuck
        for r, conn in list(open_conns.items()):
            if conn in ready or conn.poll():
                try:
                    reports[r] = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    pass
                del open_conns[r]
        for r in alive:
            if procs[r].sentinel in ready:
                procs[r].join(timeout=0)
        if deadline is None:
            failed = any(k != "ok" for k, *_ in reports.values()) or any(
                p.exitcode not in (None, 0) for p in procs)
            if failed:
                deadline = time.monotonic() + REPORT_GRACE_S
            elif 0 in reports:
                deadline = time.monotonic() + FINISH_GRACE_S


def _terminate_like_ctrl_c():
    """While ranks run, SIGTERM (a service manager's stop) raises `Terminated`, a
    KeyboardInterrupt, so the ranks get Ctrl-C's bounded shutdown. Only in the main thread and
    only over the default action (`weavelm serve` installs its own). Returns the undo."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return lambda: None
    signal.signal(signal.SIGTERM, raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def spawn(fn, nprocs: int, *args):
    """Run fn(*args) on ranks 0..nprocs-1; return rank 0's result. `fn` must be picklable."""
    ctx = mp.get_context("spawn")
    store_dir = tempfile.mkdtemp(prefix="weavelm-rendezvous-")
    store = os.path.join(store_dir, "store")
    procs, conns = [], []
    reports: dict[int, tuple] = {}
    failure = None
    restore = _terminate_like_ctrl_c()
    try:
        for r in range(nprocs):
            receiver, sender = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, name=f"weavelm-rank{r}", daemon=False,
                            args=(r, nprocs, store, os.getpid(), fn, args, sender))
            p.start()
            sender.close()                          # EOF on the receiver once the rank is gone
            procs.append(p)
            conns.append(receiver)
        _collect(procs, conns, reports)
        failure = _failure(procs, reports)
        if failure is None and reports.get(0, ("",))[0] != "ok":
            failure = WeavelmError("rank 0 ended without a result: see the output above")
    finally:
        restore()           # a second SIGTERM while stopping ends this process (ranks follow)
        _stop(procs, finished=failure is None and len(reports) == nprocs)
        for c in conns:
            c.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    if failure is not None:
        raise failure
    return pickle.loads(reports[0][1])


def run_ranks(fn, tp: int, *args):
    """`fn(*args)` on every rank: in this process when TP is 1 or a launcher (torchrun,
    accelerate launch: they set WORLD_SIZE) already started the ranks, else in `tp` spawned
    processes. Returns rank 0's result (None on other ranks)."""
    if "WORLD_SIZE" in os.environ:       # the launcher's process: its threads are its own
        return fn(*args)
    if tp == 1:
        set_cpu_threads(1)
        return fn(*args)
    return spawn(fn, tp, *args)
