"""Tensor parallelism: process groups, TP layers, communicators, rank spawning."""
from weavelm.parallel.state import (
    ParallelState, divide, get_state, init_parallel, destroy_parallel,
)
from weavelm.parallel.communicator import Communicator, FusedCollective, TorchCommunicator
from weavelm.parallel.backends import make_communicator
from weavelm.parallel.layers import (
    ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
    VocabParallelEmbedding, ParallelLMHead,
)

__all__ = [
    "ParallelState", "divide", "get_state", "init_parallel", "destroy_parallel",
    "Communicator", "FusedCollective", "TorchCommunicator", "make_communicator",
    "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
    "RowParallelLinear", "VocabParallelEmbedding", "ParallelLMHead",
]
