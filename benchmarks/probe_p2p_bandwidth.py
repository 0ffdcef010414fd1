"""Probe: NVLink bandwidth of SM loads from peers (pull) vs SM stores to peers (push), per CTA
count — what a few-CTA communication kernel can reach with each.

pull: every rank reads the rows it owns from the N-1 peers' buffers (16-byte volatile loads),
      sums them and writes the sum locally: a pull reduce-scatter's NVLink traffic.
push: every rank reads its own rows locally and stores them into the N-1 peers' buffers:
      a push all-gather's (or push reduce-scatter's) NVLink traffic.
Each thread keeps U vectors in flight. All ranks run at once; the slowest rank's median.

    torchrun --nproc-per-node 4 benchmarks/probe_p2p_bandwidth.py [--tokens 4096,16384]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist


def kernels(world: int, unroll: int):
    from numba import int64, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    cuda = numba_cuda()
    ld_peer, ld, st = ptx.load_v4_u32_volatile, ptx.load_v4_u32, ptx.store_v4_u32
    U, n = unroll, world
    n_pull, n_push = U * n * 4, U * 4      # u32 words of one iteration's loads

    @cuda.jit
    def pull(tab, rank, x_off, out_ptr, nv):
        ptrs = cuda.local.array(n, int64)
        for p in range(n):
            ptrs[p] = tab[p]
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        raw = cuda.local.array(n_pull, uint32)
        base = x_off + rank * nv * 16
        while i < nv:
            for u in range(U):              # every load of the iteration first
                k = i + u * stride
                if k < nv:
                    for p in range(n):
                        if p != rank:
                            w = ld_peer(ptrs[p] + base + k * 16)
                            for e in range(4):
                                raw[(u * n + p) * 4 + e] = w[e]
            for u in range(U):
                k = i + u * stride
                if k < nv:
                    a0 = a1 = a2 = a3 = uint32(0)
                    for p in range(n):
                        if p != rank:
                            a0 ^= raw[(u * n + p) * 4]
                            a1 ^= raw[(u * n + p) * 4 + 1]
                            a2 ^= raw[(u * n + p) * 4 + 2]
                            a3 ^= raw[(u * n + p) * 4 + 3]
                    st(out_ptr + k * 16, a0, a1, a2, a3)
            i += U * stride

    @cuda.jit
    def push(tab, rank, x_off, src_ptr, nv):
        ptrs = cuda.local.array(n, int64)
        for p in range(n):
            ptrs[p] = tab[p]
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        raw = cuda.local.array(n_push, uint32)
        base = x_off + rank * nv * 16
        while i < nv:
            for u in range(U):              # every local load of the iteration first
                k = i + u * stride
                if k < nv:
                    w = ld(src_ptr + k * 16)
                    for e in range(4):
                        raw[u * 4 + e] = w[e]
            for u in range(U):
                k = i + u * stride
                if k < nv:
                    for p in range(n):
                        if p != rank:
                            st(ptrs[p] + base + k * 16, raw[u * 4], raw[u * 4 + 1],
                               raw[u * 4 + 2], raw[u * 4 + 3])
            i += U * stride

    return pull, push


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--ctas", default="4,8,16,32")
    ap.add_argument("--unroll", default="1,4")
    args = ap.parse_args()
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.parallel.backends import make_communicator
    from weavelm.parallel.state import init_parallel
    state = init_parallel(int(os.environ["WORLD_SIZE"]), "cuda")
    rank, n, D = state.rank, state.world_size, args.hidden
    cuda = numba_cuda()
    comm = make_communicator("p2p", state)
    tokens = [int(t) for t in args.tokens.split(",")]
    comm.reserve(max(tokens), D, torch.bfloat16)
    tab = comm.buf.ptr_table
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    rows = []
    for T in tokens:
        nv = (T // n) * D * 2 // 16                  # 16-byte vectors of one rank's rows
        mb = (n - 1) * nv * 16 / 1e6                 # NVLink bytes per rank, one direction
        local = torch.empty(nv * 16, dtype=torch.uint8, device="cuda")
        for U in (int(u) for u in args.unroll.split(",")):
            pull, push = kernels(n, U)
            for c in (int(c) for c in args.ctas.split(",")):
                for name, k, a in (("pull", pull, (tab, rank, 0, local.data_ptr(), nv)),
                                   ("push", push, (tab, rank, 0, local.data_ptr(), nv))):
                    launch = k[c, 512, stream]
                    for _ in range(2):
                        launch(*a)
                    times = []
                    for _ in range(10):
                        dist.barrier()
                        torch.cuda.synchronize()
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                            enable_timing=True)
                        e0.record()
                        for _ in range(3):
                            launch(*a)
                        e1.record()
                        e1.synchronize()
                        times.append(e0.elapsed_time(e1) * 1e3 / 3)
                    t = torch.tensor([statistics.median(times)], device="cuda")
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    rows.append((T, name, U, c, t.item(), mb / t.item() * 1e3))
    if rank == 0:
        print("| tokens | kind | vectors in flight / thread | CTAs | µs | "
              "GB/s per rank, one way |")
        print("| --- | --- | --- | --- | --- | --- |")
        for T, name, U, c, us, gbs in rows:
            print(f"| {T} | {name} | {U} | {c} | {us:.1f} | {gbs:.0f} |", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
