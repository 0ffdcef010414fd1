"""Pipeline parallelism: which layers a stage holds, and what crosses from one stage to the next.

T = tokens in the step, D = hidden size, N = TP ranks of a stage (the same in every stage).

Each stage holds a contiguous range of decoder layers (`stage_layers`; the embedding on the
first stage, the final norm and the LM head on the last); a module another stage holds is a
`MissingModule` in its place, so checkpoint names keep their indices. Between stages travels the
residual stream h [T, D] after the stage's last layer (before any norm): TP rank r of stage s
sends its rows `row_range(T, r, N)` to TP rank r of stage s + 1 (1/N of the bytes per link,
the rows the sequence-sharded weave already holds), which gathers them inside its TP group.
The sampled tokens (and log-probability tables) go from the last stage's first rank to every
rank over the world group, so every rank's engine keeps the same requests.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from weavelm.parallel.communicator import TorchCommunicator, row_range
from weavelm.parallel.state import ParallelState, get_state


def stage_layers(num_layers: int, stage: int, num_stages: int) -> range:
    """The layers `stage` holds: contiguous and balanced, the first stages taking one more
    where the layers do not divide evenly."""
    lo, hi = row_range(num_layers, stage, num_stages)
    return range(lo, hi)


class MissingModule(nn.Module):
    """A module another pipeline stage holds: no parameters, and an error if called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module lives on another pipeline stage")


def building_stage(num_layers: int) -> tuple[range, bool, bool]:
    """(layers, first stage?, last stage?) of the model being built on this rank."""
    state = get_state()
    return (stage_layers(num_layers, state.stage, state.num_stages), state.is_first_stage,
            state.is_last_stage)


class PipelineLink:
    """This rank's links to its neighbour stages and to every rank (the world group)."""

    def __init__(self, state: ParallelState):
        self.state = state
        self.stages = state.num_stages

    @property
    def last_src(self) -> int:
        """The global rank that samples: the last stage's first TP rank."""
        return self.state.global_rank_of(self.stages - 1, 0)

    def send_rows(self, h: torch.Tensor) -> None:
        """Send this rank's rows of h [T, D] to the same TP rank of the next stage."""
        st = self.state
        lo, hi = row_range(h.shape[0], st.rank, st.world_size)
        dist.send(h[lo:hi].contiguous(), dst=st.global_rank_of(st.stage + 1, st.rank),
                  group=st.world_group)

    def recv_rows(self, n_rows: int, hidden: int, dtype, comm) -> torch.Tensor:
        """h [T, D] from the previous stage: this rank's rows, then the TP group's gather."""
        st = self.state
        lo, hi = row_range(n_rows, st.rank, st.world_size)
        rows = torch.empty(hi - lo, hidden, dtype=dtype, device=st.device)
        dist.recv(rows, src=st.global_rank_of(st.stage - 1, st.rank), group=st.world_group)
        return comm.all_gather(rows, n_rows) if st.world_size > 1 else rows

    def broadcast_from_last(self, t: torch.Tensor, async_op: bool = False):
        """t (contiguous) from the last stage's first rank on every rank, in place. With
        `async_op` the work handle (wait before reading t), so earlier stages go on meanwhile."""
        assert t.is_contiguous(), "a broadcast tensor must be contiguous"
        return dist.broadcast(t, src=self.last_src, group=self.state.world_group,
                              async_op=async_op)


def host_communicator(comm, state: ParallelState):
    """What the engine broadcasts its inputs and tokens over: the TP communicator itself in a
    single stage (as before pipelines); with several, the torch communicator over the world
    group, every rank of every stage as one group (sources by global rank)."""
    if state.num_stages == 1:
        return comm
    world = dataclasses.replace(state, rank=state.global_rank, world_size=state.num_ranks,
                                group=state.world_group, stage=0, num_stages=1)
    return TorchCommunicator(world)
