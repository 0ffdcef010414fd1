"""Communicator backends by name, and `auto`: which one this machine should use.

    comm = make_communicator("auto", state)     # torch | p2p | multimem | auto

`torch` is the unfused reference (NCCL on GPU, gloo on CPU); `p2p` and `multimem` run weavelm's
fused kernels over peer pointers or a multicast address (`fused_communicator.py`), imported only
when asked for (they need numba and CUDA). Multicast is never chosen, or even probed, where the
environment forbids it (`multicast_guard.py`; docs/architecture.md, "Why multicast is guarded").
Once the multimem transport failed its first-use self-check (`transport_check.py`), the process
uses p2p wherever it would have used multimem.
"""
from __future__ import annotations

import logging
import os

import torch

from weavelm.errors import WeavelmError
from weavelm.parallel.communicator import Communicator, TorchCommunicator
from weavelm.parallel import transport_check
from weavelm.parallel.multicast_guard import multicast_allowed
from weavelm.parallel.state import ParallelState

log = logging.getLogger("weavelm")

BACKENDS = ("torch", "p2p", "multimem")


def available_backends() -> list[str]:
    return [*BACKENDS, "auto"]


def select_backend(state: ParallelState) -> str:
    """'multimem' if multicast is allowed and supported, else 'p2p' if every pair of this
    host's TP GPUs has peer access, else 'torch'. Says which, and why, in the log."""
    name, why = "torch", ""
    if state.device.type != "cuda":
        why = "not on CUDA"
    elif state.world_size == 1:
        why = "one rank: nothing to communicate"
    elif torch.cuda.device_count() < state.world_size or \
            int(os.environ.get("LOCAL_WORLD_SIZE", state.world_size)) != state.world_size:
        why = "the TP group spans more than this host's GPUs"
    else:
        index = state.device.index if state.device.index is not None else 0
        name, why = fused_choice(index, state.world_size)
    log.info("weavelm communicator: auto -> %s (%s)", name, why)
    return name


def fused_choice(index: int, n: int) -> tuple[str, str]:
    """(multimem | p2p | torch, why) for n GPUs of this host, asked on device `index`."""
    mc_ok, mc_reason = multicast_allowed(index)
    if mc_ok and torch.cuda.get_device_capability(index) >= (9, 0):
        if transport_check.fallback():
            return "p2p", transport_check.fallback()
        return "multimem", (f"{mc_reason}; its first call of each kernel is checked against "
                            "p2p, and a mismatch switches the process to p2p")
    peer = all(torch.cuda.can_device_access_peer(i, j)
               for i in range(n) for j in range(n) if i != j)
    return ("p2p" if peer else "torch"), f"multicast off ({mc_reason}); " + \
        ("peer access between all GPUs" if peer else "no peer access between all GPUs")


def default_backend(state: ParallelState) -> str:
    """`auto` where a fused backend can pay (GPUs and a second rank), else `torch`."""
    return "auto" if state.device.type == "cuda" and state.world_size > 1 else "torch"


def make_communicator(backend: str | None, state: ParallelState) -> Communicator:
    """A new communicator over `state`'s TP group (None: `default_backend`)."""
    backend = backend or default_backend(state)
    if backend == "auto":
        backend = select_backend(state)
    if backend == "torch":
        return TorchCommunicator(state)
    if backend not in BACKENDS:
        raise WeavelmError(f"unknown communicator backend {backend!r}: "
                           f"choose one of {', '.join(available_backends())}")
    from weavelm.parallel import fused_communicator
    if backend == "multimem" and transport_check.fallback():
        log.warning("weavelm communicator: multimem asked for, p2p used (%s)",
                    transport_check.fallback())
        backend = "p2p"
    cls = fused_communicator.P2PCommunicator if backend == "p2p" else \
        fused_communicator.MultimemCommunicator
    return cls(state)
