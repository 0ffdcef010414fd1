"""N simulated ranks for the all-reduce kernels in the CUDA simulator (shared by the p2p and the
multimem tests).

Each rank's "symmetric buffer" is a CPU tensor [data | signal area]; the peer table holds their
host addresses (the ptx primitives' simulator models read and write host memory at an address),
and an emulated multicast object (`weavelm.kernels.multicast_sim`) maps one multicast address
range onto every buffer, as cuMulticastBindMem would. The simulator runs one kernel at a time,
so ranks run one after another; that is faithful for the data path because ranks own disjoint
rows. The barriers cannot meet sequentially, so a round lends every rank the signals of the
ranks that run after it (`run_round`) - except in the timeout tests, where a rank is left
missing on purpose.
"""
from __future__ import annotations

import torch

from weavelm.kernels import allreduce_norm as A
from weavelm.kernels.allreduce_norm_layout import MAX_CTAS, MAX_RANKS, SIG_BYTES
from weavelm.kernels.multicast_sim import MulticastGroup


class Ranks:
    """N simulated ranks: buffers [data | signal area], the peer table, the multicast group
    (`fault`: see MulticastGroup), helpers."""

    def __init__(self, n: int, data_bytes: int, fault: str | None = None):
        self.n, self.data = n, data_bytes
        self.bufs = [torch.zeros(data_bytes + SIG_BYTES, dtype=torch.uint8) for _ in range(n)]
        self.tab = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64)
        self.err_host = torch.zeros(n, dtype=torch.int32)
        self.group = MulticastGroup([b.data_ptr() for b in self.bufs], data_bytes + SIG_BYTES,
                                    fault=fault)

    def peers(self, r: int, kind: str = "p2p") -> A.Peers:
        """Rank r's Peers; the multicast address only for the multimem transport (p2p gets 0,
        so a p2p kernel that touched it would fail)."""
        mc = self.group.address if kind == "multimem" else 0
        return A.Peers(self.tab.data_ptr(), self.bufs[r].data_ptr(), mc, r, self.n, self.data,
                       self.err_host.data_ptr() + 4 * r, 0)

    def sig(self, r: int) -> torch.Tensor:
        return self.bufs[r][self.data:].view(torch.int32)

    def slots(self, r: int) -> torch.Tensor:
        return self.sig(r)[:MAX_CTAS * MAX_RANKS].view(MAX_CTAS, MAX_RANKS)

    def pre_arrive(self, barriers: int = 2, missing: int | None = None) -> None:
        """Add `barriers` to every slot [b][src], as if every rank but `missing` had signalled."""
        for r in range(self.n):
            for src in range(self.n):
                if src != r and src != missing:  # a rank's own signal comes from its own launch
                    self.slots(r)[:, src] += barriers

    def run_round(self, launch, barriers: int = 2) -> None:
        """launch(r) for every rank in turn. Before rank r runs, the ranks after it have not
        signalled yet: lend r their `barriers` signals, and take the loan back once they ran, so
        the slots end exactly as N concurrent launches leave them."""
        for r in range(self.n):
            self.slots(r)[:, r + 1:self.n] += barriers
            launch(r)
        for r in range(self.n):
            self.slots(r)[:, r + 1:self.n] -= barriers

    def x(self, r: int, T: int, D: int, dtype) -> torch.Tensor:
        return self.bufs[r][: T * D * torch.finfo(dtype).bits // 8].view(dtype).view(T, D)

    def close(self) -> None:
        self.group.close()


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
