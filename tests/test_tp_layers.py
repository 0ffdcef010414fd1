"""TP layers at TP=1, 2, 4 (gloo ranks) equal nn.Linear / nn.Embedding computed in float64.
Layers leave partial sums; the test reduces them with the torch communicator, as a schedule
would."""
import pytest
import torch
import torch.nn.functional as F

from weavelm.parallel.launch import spawn


def _check_layers(tp: int) -> dict:
    from weavelm.parallel import (ColumnParallelLinear, MergedColumnParallelLinear,
                                  ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                  TorchCommunicator, VocabParallelEmbedding, init_parallel)
    comm = TorchCommunicator(init_parallel(tp, "cpu"))
    rank = torch.distributed.get_rank() if tp > 1 else 0
    g = torch.Generator().manual_seed(1234)            # same full weights on every rank
    dt = torch.float64
    x = torch.randn(7, 24, generator=g, dtype=dt)      # 7 tokens, odd on purpose
    W1, b1 = torch.randn(40, 24, generator=g, dtype=dt), torch.randn(40, generator=g, dtype=dt)
    W2, b2 = torch.randn(24, 40, generator=g, dtype=dt), torch.randn(24, generator=g, dtype=dt)
    E = torch.randn(50, 24, generator=g, dtype=dt)     # 50 rows: not divisible by 4 or 3
    Wg, Wu = torch.randn(32, 24, generator=g, dtype=dt), torch.randn(32, generator=g, dtype=dt)
    Wu = torch.randn(32, 24, generator=g, dtype=dt)
    errs = {}

    col = ColumnParallelLinear(24, 40, bias=True, params_dtype=dt)
    col.weight.weight_loader(col.weight, W1)
    col.bias.weight_loader(col.bias, b1)
    h = col(x)                                         # [7, 40/N], this rank's block
    n = 40 // tp
    errs["column_local"] = (h - F.linear(x, W1, b1)[:, rank * n:(rank + 1) * n]).abs().max().item()
    errs["column_gather"] = (comm.all_gather_last_dim(h) - F.linear(x, W1, b1)).abs().max().item()

    row = RowParallelLinear(40, 24, bias=True, params_dtype=dt)
    row.weight.weight_loader(row.weight, W2)
    row.bias.weight_loader(row.bias, b2)
    ref_mlp = F.linear(F.linear(x, W1, b1), W2, b2)
    errs["column_row_sum"] = (comm.all_reduce(row(h)) - ref_mlp).abs().max().item()
    staged = torch.empty(7, 24, dtype=dt)              # a communicator's staging buffer
    assert row(h, out=staged) is staged
    errs["row_into_out"] = (comm.all_reduce(staged) - ref_mlp).abs().max().item()

    merged = MergedColumnParallelLinear(24, [32, 32], params_dtype=dt)
    merged.weight.weight_loader(merged.weight, Wg, 0)
    merged.weight.weight_loader(merged.weight, Wu, 1)
    gate, up = merged(x).chunk(2, dim=-1)
    m = 32 // tp
    errs["merged"] = max((gate - F.linear(x, Wg)[:, rank * m:(rank + 1) * m]).abs().max().item(),
                         (up - F.linear(x, Wu)[:, rank * m:(rank + 1) * m]).abs().max().item())

    # 4 query heads, 1 KV head of dim 6: at TP 2 and 4 the KV head is replicated.
    Wq, Wk = torch.randn(24, 24, generator=g, dtype=dt), torch.randn(6, 24, generator=g, dtype=dt)
    Wv = torch.randn(6, 24, generator=g, dtype=dt)
    qkv = QKVParallelLinear(24, 6, 4, 1, params_dtype=dt)
    for sid, W in (("q", Wq), ("k", Wk), ("v", Wv)):
        qkv.weight.weight_loader(qkv.weight, W, sid)
    q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
    qn = 24 // tp
    errs["qkv"] = max((q - F.linear(x, Wq)[:, rank * qn:(rank + 1) * qn]).abs().max().item(),
                      (k - F.linear(x, Wk)).abs().max().item(),
                      (v - F.linear(x, Wv)).abs().max().item())

    emb = VocabParallelEmbedding(50, 24, params_dtype=dt)
    emb.weight.weight_loader(emb.weight, E)
    ids = torch.tensor([0, 49, 12, 13, 25, 37, 38, 1])
    errs["embedding"] = (comm.all_reduce(emb(ids)) - F.embedding(ids, E)).abs().max().item()

    head = ParallelLMHead(50, 24, params_dtype=dt)
    head.weight.weight_loader(head.weight, E)
    errs["lm_head"] = (head(x, comm) - F.linear(x, E)).abs().max().item()
    bad = {k: v for k, v in errs.items() if not v < 1e-12}
    assert not bad, f"rank {rank}: {bad}"          # every rank checks its own outputs
    return errs


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_layers_match_float64_reference(tp):
    errs = spawn(_check_layers, tp, tp) if tp > 1 else _check_layers(1)
    assert set(errs) >= {"column_gather", "column_row_sum", "embedding", "lm_head", "qkv"}
    bad = {k: v for k, v in errs.items() if not v < 1e-12}
    assert not bad, bad
