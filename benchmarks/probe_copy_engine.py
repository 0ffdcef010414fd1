"""Probe: how fast do the copy engines move a reduce-scatter's or all-gather's bytes between
GPUs, next to NCCL; and does the GEMM SM carveout (`gemm_sm_carveout`) take effect?

Each rank pushes the rows every peer owns (rows(T) of peer j, `row_range`) into that peer's
symmetric buffer with `copy_` into a peer view (a cudaMemcpy: copy engines, no SMs): one stream
with the N-1 copies in a row, and N-1 streams at once. These are the bytes each GPU sends in a
reduce-scatter (and again in an all-gather). Then, per rank and alone, the Llama-3-70B TP=4
down-projection GEMM with cuBLAS as is and with SM carveouts.

    torchrun --nproc-per-node 4 benchmarks/probe_copy_engine.py [--tokens 1024,4096,16384]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from cuda_timing import cuda_time_us


def timed(fn, reduce_max=True):
    return cuda_time_us(fn, 20, 3, ranks="each" if reduce_max else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--gemm-only", action="store_true")
    args = p.parse_args()
    from weavelm.parallel.backends import make_communicator
    from weavelm.parallel.communicator import row_range
    from weavelm.parallel.sm_carveout import gemm_sm_carveout
    from weavelm.parallel.state import init_parallel
    state = init_parallel(int(os.environ["WORLD_SIZE"]), "cuda")
    rank, n, D, dt = state.rank, state.world_size, args.hidden, torch.bfloat16
    comm = make_communicator("p2p", state)
    tokens = [int(t) for t in args.tokens.split(",")]
    comm.reserve(2 * max(tokens), D, dt)
    streams = [torch.cuda.Stream() for _ in range(n)]
    rows = []
    for T in ([] if args.gemm_only else tokens):
        src = comm.staging(T, D, dt)
        src.normal_()
        inbox_off = T * D * 2
        max_rows = -(-T // n)
        pushes = []
        for j in range(n):
            if j == rank:
                continue
            s, e = row_range(T, j, n)
            dst = comm.buf.peer_view(j, e - s, D, dt, inbox_off + rank * max_rows * D * 2)
            pushes.append((dst, src[s:e]))

        def one_stream():
            for dst, x in pushes:
                dst.copy_(x, non_blocking=True)

        def many_streams():
            cur = torch.cuda.current_stream()
            for (dst, x), st in zip(pushes, streams):
                st.wait_stream(cur)
                with torch.cuda.stream(st):
                    dst.copy_(x, non_blocking=True)
            for st in streams[:len(pushes)]:
                cur.wait_stream(st)

        full = torch.randn(T, D, device="cuda", dtype=dt)
        out_rows = torch.empty(max_rows, D, device="cuda", dtype=dt)
        pad = torch.zeros(max_rows * n, D, device="cuda", dtype=dt)
        gathered = torch.empty(max_rows * n, D, device="cuda", dtype=dt)
        r = dict(T=T, MB_sent=sum(x.numel() * 2 for _, x in pushes) / 1e6)
        r["CE one stream"] = timed(one_stream)
        r["CE N-1 streams"] = timed(many_streams)
        r["NCCL reduce-scatter"] = timed(lambda: dist.reduce_scatter_tensor(out_rows, pad))
        r["NCCL all-gather"] = timed(lambda: dist.all_gather_into_tensor(gathered, out_rows))
        r["NCCL all-reduce"] = timed(lambda: dist.all_reduce(full))
        # check: after one push of rank-tagged rows, I hold every peer's tag in its inbox rows
        src.fill_(rank + 1)
        dist.barrier()
        one_stream()
        torch.cuda.synchronize()
        dist.barrier()
        ok = True
        for j in range(n):
            if j == rank:
                continue
            s, e = row_range(T, rank, n)
            got = comm.buf.view(e - s, D, dt, inbox_off + j * max_rows * D * 2)
            ok &= bool((got == j + 1).all().item())
        r["ok"] = ok
        print(f"[rank {rank}] T={T} pushed rows arrived intact: {ok}", flush=True)
        rows.append(r)
    if rank == 0:
        print("| T | MB sent per rank | CE one stream µs (GB/s) | CE N-1 streams µs (GB/s) | "
              "NCCL reduce-scatter µs | NCCL all-gather µs | NCCL all-reduce µs |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            gbs = lambda us: r["MB_sent"] / us * 1e3  # noqa: E731  MB/µs -> GB/s
            print(f"| {r['T']} | {r['MB_sent']:.1f} | {r['CE one stream']:.1f} "
                  f"({gbs(r['CE one stream']):.0f}) | {r['CE N-1 streams']:.1f} "
                  f"({gbs(r['CE N-1 streams']):.0f}) | {r['NCCL reduce-scatter']:.1f} | "
                  f"{r['NCCL all-gather']:.1f} | {r['NCCL all-reduce']:.1f} |", flush=True)
    # GEMM carveout, alone on each GPU (no barrier: per-GPU)
    K, N = 28672 // n, D
    w = torch.randn(N, K, device="cuda", dtype=dt) * 0.02
    lines = []
    for T in (2048, 4096, 8192):
        x = torch.randn(T, K, device="cuda", dtype=dt)
        y = torch.empty(T, N, device="cuda", dtype=dt)
        gemm = lambda: torch.matmul(x, w.t(), out=y)  # noqa: E731
        res = {"cublas": timed(gemm, reduce_max=False)}
        for c in (4, 8, 16, 32):
            with gemm_sm_carveout(c):
                res[f"carveout {c}"] = timed(gemm, reduce_max=False)
        lines.append(f"| {T} | " + " | ".join(f"{v:.1f}" for v in res.values()) + " |")
        head = "| T | " + " | ".join(res) + " |"
    if rank == 0:
        print(f"\nGEMM [T, {K}] x [{K}, {N}] bf16 on rank 0, µs (median of 20):")
        print(head)
        print("| --- |" + " --- |" * (len(lines[0].split("|")) - 3))
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
