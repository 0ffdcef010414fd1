"""The weave on every visible GPU (p2p backend): `weave` and `fused` give the same final hidden
states as `baseline` (within the bf16 difference between two baselines) on a random Llama-3-70B-shaped model with 4 layers, for
1000, 4096 and 13000 tokens in several sequences (the split cuts a sequence in two).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    WEAVELM_DISABLE_MULTICAST=1 python3 -m pytest -q -s tests/gpu/test_weave_multigpu.py
"""
import os

import pytest
import torch

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1"), ("WEAVELM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_k, _v)

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(N_GPUS < 2, reason="needs two or more CUDA GPUs")]
CASES = [(1000, 300), (4096, 1500), (13000, 5000)]       # (tokens, sequence length)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _rank(tp):
    from weavelm.bench.prefill import PrefillTimer
    from weavelm.parallel.state import init_parallel
    init_parallel(tp, "cuda")
    report = []
    runner = PrefillTimer("llama3-70b", 4, tp, "p2p", None)
    for tokens, seq_len in CASES:
        runner.seq_len = seq_len
        split = runner.split_for(tokens)
        inputs = runner._inputs(tokens)
        ref = runner.forward(tokens, "baseline", None, inputs).float()
        row = {"tokens": tokens, "split": split, "backend": runner.backend}
        outs = {}
        for mode in ("fused", "weave"):
            outs[mode] = runner.forward(tokens, mode, split if mode == "weave" else None,
                                        inputs).float()
            torch.cuda.synchronize()
            row[mode] = rel(outs[mode], ref)
        row["weave_vs_fused"] = rel(outs["weave"], outs["fused"])
        # A race between the halves (or with peers) would change the result from run to run:
        # the weave must be bitwise deterministic over repeated runs.
        again = [runner.forward(tokens, "weave", split, inputs).float() for _ in range(3)]
        row["weave_deterministic"] = all(torch.equal(a, outs["weave"]) for a in again)
        # No row may be far off (a missed or stale row shows up here, not in the L2 norm).
        row_err = ((outs["weave"] - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        row["weave_worst_row"] = row_err
        # every rank must hold the same hidden states
        gathered = [torch.empty_like(ref) for _ in range(tp)]
        torch.distributed.all_gather(gathered, ref)
        row["ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)
        runner.executor.comm.check_errors(sync=True)
        report.append(row)
    return report


def test_weave_matches_baseline_on_gpus():
    from weavelm.parallel.launch import spawn
    report = spawn(_rank, N_GPUS, N_GPUS)
    print("\n" + "\n".join(str(r) for r in report))
    ends_cut = [r for r in report if r["split"] % dict(CASES)[r["tokens"]] != 0]
    assert ends_cut, "some split should cut a sequence"
    for r in report:
        assert r["backend"] == "p2p", r
        assert r["ranks_agree"], r
        assert r["weave_deterministic"], r
        # bf16 through 4 random-weight layers: the fused kernel's fp32 sums and the NCCL
        # baseline's bf16 sums differ by 1.7-2.0e-2 (x2 and x4 H100, measured); bound it.
        assert r["fused"] < 3e-2 and r["weave"] < 3e-2, r
        # Halves run GEMMs of other shapes (other cuBLAS kernels, other rounding), so weave and
        # fused may differ, but by less than the fused kernel's own rounding differs from
        # baseline.
        assert r["weave_vs_fused"] < r["fused"], r
        assert r["weave_worst_row"] < 0.1, r
