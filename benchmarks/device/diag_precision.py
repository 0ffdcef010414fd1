"""Where does fused-vs-baseline difference come from? Compare baseline over NCCL (bf16 sums),
baseline over the p2p all-reduce (fp32 sums) and the fused schedule, pairwise (rel. L2)."""
import os
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402


def rank(tp):
    from weavelm.engine.prefill_bench import PrefillRunner
    from weavelm.parallel.communicator import use_communicator
    from weavelm.parallel.state import init_parallel
    init_parallel(tp, "cuda")
    r = PrefillRunner("llama3-70b", 4, tp, "p2p", 1500)
    inputs = r._inputs(4096)
    base_nccl = r.forward(4096, "baseline", None, inputs).float()
    with torch.no_grad(), use_communicator(r.fused_comm):
        base_p2p = r.model(*inputs, "baseline", None).float()
    fused = r.forward(4096, "fused", None, inputs).float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"nccl_vs_p2p_baseline": rel(base_nccl, base_p2p), "fused_vs_p2p_baseline":
            rel(fused, base_p2p), "fused_vs_nccl_baseline": rel(fused, base_nccl)}


if __name__ == "__main__":
    from weavelm.parallel.launch import spawn
    print(spawn(rank, torch.cuda.device_count(), torch.cuda.device_count()))
