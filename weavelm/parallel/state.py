"""The process groups and this process's place in them: tensor parallelism (TP) inside a stage,
pipeline parallelism (PP) across stages.

Ranks are laid out stage-major: global rank = stage * TP + TP rank, so the TP ranks of one
stage are consecutive (one node each under `torchrun --nnodes PP --nproc-per-node TP`). Every
stage has its own TP group (collectives of the model and the fused communicator stay inside
it); the world group carries what crosses stages (`parallel/pipeline.py`).

Works under `torchrun` and `accelerate launch` (both set RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous address), under `weavelm.parallel.launch.spawn` (which sets the same variables), and
in a plain single process (TP=1, no process group at all). NCCL on CUDA, gloo on CPU.

This module is the only place that creates or destroys the process group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from weavelm.errors import WeavelmError, check


def divide(numerator: int, denominator: int) -> int:
    """numerator / denominator, asserting exact division (Megatron's `divide`)."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


# Every collective gives up after this long waiting for a peer (a dead, stopped or stuck rank),
# instead of torch's 30 minutes. Startup (joining the group, loading weights: see
# `arm_collective_timeout`) may take longer: ranks import torch and load weights at their own
# pace on a busy host.
TIMEOUT_ENV = "WEAVELM_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = {"cpu": 30.0, "cuda": 300.0}
STARTUP_TIMEOUT_S = 120.0


@dataclass
class ParallelState:
    """`rank`, `world_size` and `group` are the TP group's (what the model's layers and
    communicators use); `stage` / `num_stages` place this rank in the pipeline."""
    rank: int
    world_size: int
    device: torch.device
    group: "dist.ProcessGroup | None"   # the TP group; None when world_size == 1
    timeout_s: float = DEFAULT_TIMEOUT_S["cpu"]   # the collective timeout
    stage: int = 0                      # this rank's pipeline stage
    num_stages: int = 1
    world_group: "dist.ProcessGroup | None" = None   # every rank of every stage (None: one)

    @property
    def is_first(self) -> bool:
        """The first rank of the world (prints, progress bars, the server)."""
        return self.rank == 0 and self.stage == 0

    @property
    def global_rank(self) -> int:
        return self.stage * self.world_size + self.rank

    @property
    def num_ranks(self) -> int:
        return self.world_size * self.num_stages

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    def global_rank_of(self, stage: int, rank: int = 0) -> int:
        """The global rank of TP rank `rank` of `stage`."""
        return stage * self.world_size + rank

    def tp_src(self, rank: int = 0) -> int:
        """The global rank torch.distributed wants as `src` for TP rank `rank` of this stage."""
        return self.global_rank_of(self.stage, rank)


_STATE: ParallelState | None = None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or None (= cuda if available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)                       # a torch.device works too
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    check(parsed is not None and parsed.type in ("cpu", "cuda"),
          f"unknown device {device!r}: use --device cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        check(torch.cuda.is_available(),
              "--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None:
        n = torch.cuda.device_count()
        check(parsed.index < n, f"--device {device}: only {n} GPUs are visible "
                                f"(cuda:0..cuda:{n - 1})")
    return parsed


def collective_timeout(device_type: str, timeout_s: float | None = None) -> float:
    """Seconds a collective waits for a peer: `timeout_s`, else $WEAVELM_COLLECTIVE_TIMEOUT,
    else 30 on CPU and 300 on GPUs."""
    where = "--collective-timeout (collective_timeout)"
    if timeout_s is None and os.environ.get(TIMEOUT_ENV, "").strip():
        timeout_s, where = os.environ[TIMEOUT_ENV].strip(), f"${TIMEOUT_ENV}"
    if timeout_s is None:
        return DEFAULT_TIMEOUT_S.get(device_type, DEFAULT_TIMEOUT_S["cuda"])
    try:
        value = float(timeout_s)
    except (TypeError, ValueError):
        value = float("nan")
    check(0 < value < 1e6, f"{where} must be a number of seconds above 0, got {timeout_s!r}")
    return value


def init_parallel(tp: int | None = None, device: str | None = None,
                  timeout_s: float | None = None, pp: int = 1) -> ParallelState:
    """Join (or create) the process groups and pick this rank's device.

    `tp` x `pp` must match the launcher's WORLD_SIZE when one is set (`tp` None: the world
    divided by `pp`). `timeout_s` bounds every collective's wait for a peer (see
    `collective_timeout`). Calling it again returns the existing state.
    """
    global _STATE
    if _STATE is not None:
        check((tp is None or tp == _STATE.world_size) and pp == _STATE.num_stages,
              f"weavelm is already initialised with TP={_STATE.world_size} x "
              f"PP={_STATE.num_stages}, not TP={tp} x PP={pp}")
        return _STATE

    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if world is None:
        world, rank = 1, 0
    check(isinstance(pp, int) and pp >= 1, f"pp must be at least 1, got {pp!r}")
    tp = world // pp if tp is None else tp
    check(tp * pp == world,
          f"TP={tp} x PP={pp} needs {tp * pp} ranks but this process runs in a group of "
          f"{world}: launch with `torchrun --nproc-per-node {tp}` on each of {pp} nodes "
          f"(--nnodes {pp}), or use `weavelm generate --tp {tp} --pp {pp}` without a launcher")

    dev = resolve_device(device)
    timeout = collective_timeout(dev.type, timeout_s)
    if dev.type == "cuda":
        local_rank = _env_int("LOCAL_RANK")
        if local_rank is None:
            # One process without a launcher may name its GPU (cuda:N); ranks use their own.
            local_rank = dev.index if (world == 1 and dev.index is not None) else rank
        n_gpus = torch.cuda.device_count()
        check(local_rank < n_gpus,
              f"rank {rank} needs GPU {local_rank} on this host but only {n_gpus} are "
              f"visible: lower --tp (or --pp) to fit {n_gpus} GPUs, or use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)

    group = None
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            startup = datetime.timedelta(seconds=max(timeout, STARTUP_TIMEOUT_S))
            rendezvous = os.environ.get("WEAVELM_RENDEZVOUS_FILE")
            if rendezvous:        # ranks `spawn` started on this host: a file, not a socket
                kwargs["store"] = dist.FileStore(rendezvous, world)
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=startup, **kwargs)
        group = world_group = dist.group.WORLD
        _set_group_timeout(group, max(timeout, STARTUP_TIMEOUT_S))   # a launcher's group too
        if pp > 1:
            group = _stage_groups(tp, pp, rank, max(timeout, STARTUP_TIMEOUT_S))
    else:
        world_group = None
    _STATE = ParallelState(rank=rank % tp, world_size=tp, device=dev, group=group,
                           timeout_s=timeout, stage=rank // tp, num_stages=pp,
                           world_group=world_group)
    return _STATE


def _stage_groups(tp: int, pp: int, rank: int, timeout: float):
    """Every stage's TP group (each rank takes part in creating all of them); this rank's, or
    None at TP 1 (a stage of one rank has nothing to reduce)."""
    mine = None
    for stage in range(pp):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout)) \
            if tp > 1 else None
        if rank in ranks:
            mine = group
    return mine


def _set_group_timeout(group, seconds: float) -> None:
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:           # private in torch 2.x; without it the startup bound
        set_timeout(datetime.timedelta(seconds=seconds), group)


def arm_collective_timeout(state: ParallelState) -> None:
    """From now on every collective waits at most `state.timeout_s` for a peer. Until this is
    called (the model is built and loaded on every rank: ranks load at their own pace) the
    bound is max(timeout, STARTUP_TIMEOUT_S)."""
    for group in {state.group, state.world_group} - {None}:
        _set_group_timeout(group, state.timeout_s)


def get_state() -> ParallelState:
    """The state set by `init_parallel`; a single-process CPU/GPU state if it was never called."""
    if _STATE is None:
        return init_parallel()
    return _STATE


def destroy_parallel() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = None


def max_tp_for_device(device: str | None) -> int:
    """How many ranks this host can run on `device` (GPUs visible; CPU ranks are unlimited)."""
    dev = resolve_device(device)
    return torch.cuda.device_count() if dev.type == "cuda" else 1 << 30


__all__ = ["ParallelState", "divide", "init_parallel", "collective_timeout",
           "arm_collective_timeout", "get_state", "destroy_parallel",
           "resolve_device", "max_tp_for_device", "WeavelmError"]
