"""Decode attention over the paged KV cache, one GPU: weavelm's Numba kernel vs the torch path
it replaced (gather each sequence's blocks, then SDPA with a mask), same inputs, one run.

    python3 benchmarks/bench_paged_attention.py [--variants]

Llama-3-8B heads (32 query, 8 KV, head dim 128), bf16, blocks of 16 tokens handed out in shuffled
order. Each variant is timed as a CUDA graph of 20 calls (no launch overhead), median of 5
replays; the check is the largest difference from the float32 reference.
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def graph_us(fn, calls=20, repeats=5):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main():
    from weavelm.kernels import paged_attention as P
    H, Hkv, D, bs = 32, 8, 128, 16
    print(f"## paged decode attention, {torch.cuda.get_device_name()}, H={H} Hkv={Hkv} D={D}, "
          f"bf16, blocks of {bs}; µs per call (CUDA graph), KV bytes read / time\n")
    print("| batch | context | weavelm kernel µs | torch gather + SDPA µs | speed-up | "
          "kernel TB/s | max err kernel | max err torch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for B, ctx in ((1, 256), (1, 4096), (16, 256), (16, 2048), (64, 256), (64, 2048)):
        per = -(-ctx // bs)
        NB = B * per + 1
        g = torch.Generator(device="cuda").manual_seed(B * ctx)
        kc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).bfloat16()
        vc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).bfloat16()
        tables = (torch.randperm(NB - 1, device="cuda", generator=g)[:B * per] + 1).int()
        tables = tables.view(B, per).contiguous()
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, H, D, device="cuda", generator=g).bfloat16()
        scale = 1 / math.sqrt(D)
        ref = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens, scale)
        ours = P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale)
        theirs = P.paged_decode_attention_ref(q, kc, vc, tables, lens, scale)
        t_ours = graph_us(lambda: P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale))
        t_torch = graph_us(lambda: P.paged_decode_attention_ref(q, kc, vc, tables, lens, scale))
        kv_bytes = 2 * B * ctx * Hkv * D * 2
        print(f"| {B} | {ctx} | {t_ours:.1f} | {t_torch:.1f} | {t_torch / t_ours:.1f}x | "
              f"{kv_bytes / (t_ours * 1e-6) / 1e12:.2f} | "
              f"{(ours.float() - ref).abs().max().item():.2e} | "
              f"{(theirs.float() - ref).abs().max().item():.2e} |", flush=True)
    if "--variants" in sys.argv:
        variants(P, H, Hkv, D, bs)


def case(B, ctx, H, Hkv, D, bs):
    per = -(-ctx // bs)
    NB = B * per + 1
    g = torch.Generator(device="cuda").manual_seed(B * ctx)
    kc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).bfloat16()
    vc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).bfloat16()
    tables = (torch.randperm(NB - 1, device="cuda", generator=g)[:B * per] + 1).int()
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", generator=g).bfloat16()
    return q, kc, vc, tables.view(B, per).contiguous(), lens


def variants(P, H, Hkv, D, bs):
    """The kernel's shape choices side by side: query heads per CTA x key rows per lane."""
    shapes = ((64, 2048), (256, 1024), (16, 4096))
    print("\n## kernel variants: query heads per CTA (group) x key rows per lane and iteration "
          "(rows), loads one iteration ahead (pipelined), CTAs per SM the registers must allow; "
          "µs per call, TB/s\n")
    print("| group | rows | pipelined | CTAs per SM bound | "
          + " | ".join(f"{B} x {ctx}" for B, ctx in shapes) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in shapes) + " |")
    cases = [case(B, ctx, H, Hkv, D, bs) for B, ctx in shapes]
    for group, rows, pipeline, resident in ((2, 4, False, 0), (4, 4, True, 0), (4, 4, True, 3),
                                            (4, 2, True, 3), (4, 2, True, 4), (2, 4, True, 3),
                                            (2, 4, True, 4)):
        cells = []
        for (B, ctx), (q, kc, vc, tables, lens) in zip(shapes, cases):
            scale = 1 / math.sqrt(D)
            ref = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens,
                                               scale)
            run = lambda: P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale,  # noqa
                                                        group=group, rows=rows,
                                                        pipeline=pipeline, resident=resident)
            err = (run().float() - ref).abs().max().item()
            assert err < 2e-2, (group, rows, pipeline, err)
            t = graph_us(run)
            cells.append(f"{t:.1f} ({2 * B * ctx * Hkv * D * 2 / (t * 1e-6) / 1e12:.2f})")
        print(f"| {group} | {rows} | {'yes' if pipeline else 'no'} | {resident or '-'} | "
              + " | ".join(cells)
              + " |", flush=True)


if __name__ == "__main__":
    main()
