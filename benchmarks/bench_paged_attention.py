"""Decode attention over the paged KV cache, one GPU: weavelm's Numba kernel vs the torch path
it replaced (gather each sequence's blocks, then SDPA with a mask), same inputs, one run.

    python3 benchmarks/bench_paged_attention.py [--sweep] [--variants] [--schedules] [--shared]
                                                [--cascade] [--small] [--trace]
                                                [--knob=MODULE.NAME=VALUE]

Llama-3-8B heads (32 query, 8 KV, head dim 128), bf16, blocks of 16 tokens handed out in shuffled
order. Each variant is timed as a CUDA graph of 20 calls (no launch overhead), median of 5
replays; the check is the largest difference from the float32 reference. --schedules compares
how the keys are spread over CTAs on batches of equal and of serving-like (log-normal) lengths;
--shared, the order of the CTAs where sequences share a cached prefix's blocks; --cascade, the
cascade attention that reads a shared prefix once against the kernel reading every copy;
--small, keys per split for batches that leave SMs idle (`SMALL_SPLIT_KEYS`); --sweep, the
tensor-core kernel against the lane kernel and the copy rate, batch 1-1024 (or --batches=1,16),
context 128-32K; --trace, where the tensor-core kernel's time goes at small batches: its
phases from the global timer each CTA writes (`paged_attention_mma.TRACE_PTR`; a profiler
cannot split the two kernels, whose spans under programmatic dependent launch each cover the
wait for the other);
--knob sets a module constant first (benchmarks/knobs.py), e.g.
--knob=kernels.paged_attention_worklist.MIN_STEPS=4.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cuda_timing import graph_us  # noqa: E402  (this folder is on sys.path)


def main():
    import knobs
    from weavelm.kernels import paged_attention as P
    knobs.apply(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--knob="))
    H, Hkv, D, bs = 32, 8, 128, 16
    print(f"## paged decode attention, {torch.cuda.get_device_name()}, H={H} Hkv={Hkv} D={D}, "
          f"bf16, blocks of {bs}; µs per call (CUDA graph), KV bytes read / time\n")
    print("| batch | context | weavelm kernel µs | torch gather + SDPA µs | speed-up | "
          "kernel TB/s | max err kernel | max err torch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for B, ctx in ((1, 256), (1, 4096), (16, 256), (16, 2048), (64, 256), (64, 2048)):
        q, kc, vc, tables, lens = case(B, ctx, H, Hkv, D, bs)
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
    if "--sweep" in sys.argv:
        sweep(P, H, Hkv, D, bs)
    if "--trace" in sys.argv:
        trace(P, H, Hkv, D, bs)
    if "--variants" in sys.argv:
        variants(P, H, Hkv, D, bs)
    if "--schedules" in sys.argv:
        schedules(P, H, Hkv, D, bs)
    if "--shared" in sys.argv:
        shared(P, H, Hkv, D, bs)
    if "--cascade" in sys.argv:
        cascade(P, H, Hkv, D, bs)
    if "--small" in sys.argv:
        small(P, H, Hkv, D, bs)


def copy_rate() -> float:
    """Device-to-device copy, bytes read + written per second (best of 5, 1 GiB)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e-3)
    del x, y
    return 2 * (1 << 30) / best


def sweep(P, H, Hkv, D, bs):
    """The tensor-core kernel against the lane kernel at batch 1-1024 and context 128-32K
    (equal lengths, and log-normal ones as a serving batch has), KV bytes read per second as a
    fraction of the copy rate measured in this run. The tensor-core kernel twice: planning
    after the wait for the kernel before (any caller) and before it (`lens_staged`, as the
    engine calls it; the kernel before is the previous call's combine)."""
    copy = copy_rate()
    print(f"\n## sweep: tensor-core kernel (default) vs lane kernel; µs per call (CUDA graph), "
          f"KV read rate / copy rate ({copy / 1e12:.2f} TB/s, measured in this run)\n")
    print("| batch | context | lanes µs | mma µs | mma, lengths staged µs | speed-up | "
          "lanes / copy | mma / copy | staged / copy |")
    print("|" + " --- |" * 9)
    only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--batches=")]
    batches = [int(x) for x in only[0].split(",")] if only else (1, 16, 64, 256, 1024)
    shapes = [(B, ctx, None) for B in batches
              for ctx in (128, 1024, 2048, 4096, 32768) if B * ctx <= (1 << 21)]
    shapes += [(B, 0, serving_lengths(B)) for B in (16, 64, 256) if B in batches]
    for B, ctx, lengths in shapes:
        q, kc, vc, tables, lens = case(B, ctx or 1, H, Hkv, D, bs, lengths)
        scale = 1 / math.sqrt(D)
        order = P.longest_first(lens)
        ref = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens,
                                           scale) if B * max(lengths or [ctx]) <= (1 << 18) \
            else None
        times = []
        for kernel, staged in (("lanes", False), ("mma", False), ("mma", True)):
            run = lambda: P.paged_decode_attention_cuda(  # noqa: E731
                q, kc, vc, tables, lens, scale, order=order, kernel=kernel, lens_staged=staged)
            if ref is not None:
                err = (run().float() - ref).abs().max().item()
                assert err < 2e-2, (B, ctx, kernel, staged, err)
            times.append(graph_us(run))
        keys = sum(lengths) if lengths else B * ctx
        rate = [2 * keys * Hkv * D * 2 / (t * 1e-6) / copy for t in times]
        print(f"| {B} | {ctx or 'log-normal'} | {times[0]:.1f} | {times[1]:.1f} | "
              f"{times[2]:.1f} | {times[0] / times[2]:.2f}x | {rate[0]:.2f} | {rate[1]:.2f} | "
              f"{rate[2]:.2f} |", flush=True)
        del q, kc, vc, tables, lens


def trace(P, H, Hkv, D, bs):
    """The tensor-core kernel's timeline at small batches, one call outside a graph: each CTA
    writes the global timer (ns) at entry, after the wait for the kernel before, after its
    plan, when its last segment's loop starts and ends, and at exit; the
    combine's CTAs at entry, after the wait and at exit. µs from the first CTA's entry:
    medians over the CTAs with work, [max] where the last one decides."""
    from weavelm.kernels import paged_attention_mma as PM
    from weavelm.kernels import paged_attention_worklist as WL
    buf = torch.zeros(2 * WL.COMBINE_TRACE, dtype=torch.int32, device="cuda")
    PM.TRACE_PTR = buf.data_ptr()
    print("\n## the tensor-core kernel's timeline (µs from the first CTA's entry; median "
          "[max])\n")
    print("| batch | context | entered | waited | planned | loop starts | loop ends | exit | "
          "combine entered | waited | exit |")
    print("|" + " --- |" * 11)
    shapes = [(1, 2048, None), (16, 128, None), (16, 1024, None), (16, 2048, None),
              (16, 4096, None), (16, 0, serving_lengths(16)), (64, 1024, None),
              (64, 4096, None)]
    for B, ctx, lengths in shapes:
        q, kc, vc, tables, lens = case(B, ctx or 1, H, Hkv, D, bs, lengths)
        scale = 1 / math.sqrt(D)
        for _ in range(3):
            buf.zero_()
            P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale, kernel="mma")
        torch.cuda.synchronize()
        w = buf.cpu().numpy().astype("int64")
        main = w[:WL.COMBINE_TRACE].reshape(-1, PM.TRACE_WORDS)[:, :6]
        main = main[main[:, 0] != 0]
        comb = w[WL.COMBINE_TRACE:].reshape(-1, 4)[:, :3]
        comb = comb[comb[:, 0] != 0]
        t0 = main[:, 0].min()
        rel = lambda x: ((x - t0) % (1 << 32)) / 1e3  # noqa: E731 (32-bit wrap)
        busy = main[main[:, 2] != 0]                  # CTAs with work (planned)
        cells = []
        for col, rows in ((0, main), (1, main), (2, busy), (3, busy), (4, busy), (5, main)):
            v = rel(rows[:, col])
            cells.append(f"{float(sorted(v)[len(v) // 2]):.1f} [{float(v.max()):.1f}]")
        for col in range(3):
            v = rel(comb[comb[:, col] != 0][:, col]) if len(comb) else []
            cells.append(f"{float(sorted(v)[len(v) // 2]):.1f} [{float(max(v)):.1f}]"
                         if len(v) else "-")
        print(f"| {B} | {ctx or 'log-normal'} | " + " | ".join(cells) + " |", flush=True)
        del q, kc, vc, tables, lens
    PM.TRACE_PTR = 0


def small(P, H, Hkv, D, bs):
    """µs per call at batch 1-16 and short contexts, S from the plan, by keys per split."""
    counts = (32, 64, 128, 256)
    print(f"\n### keys per split where the batch leaves SMs idle (default "
          f"{P.SMALL_SPLIT_KEYS}); µs per call\n")
    print("| batch | context | S | " + " | ".join(f"{k} keys" for k in counts) + " |")
    print("|" + " --- |" * (3 + len(counts)))
    for B in (1, 4, 16):
        for ctx in (128, 256, 512, 1024, 4096):
            q, kc, vc, tables, lens = case(B, ctx, H, Hkv, D, bs)
            scale = 1 / math.sqrt(D)
            ref = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens,
                                               scale)
            row = []
            for k in counts:
                out = P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale, split_keys=k)
                assert (out.float() - ref).abs().max().item() < 2e-2, (B, ctx, k)
                row.append(graph_us(lambda: P.paged_decode_attention_cuda(
                    q, kc, vc, tables, lens, scale, split_keys=k)))
            S = P.split_plan(B, H // P.head_group(H, Hkv), 0)[0]
            print(f"| {B} | {ctx} | {S} | " + " | ".join(f"{t:.1f}" for t in row) + " |",
                  flush=True)


def case(B, ctx, H, Hkv, D, bs, lengths=None):
    """Random q and cache for B sequences of ctx keys (or of `lengths`), blocks shuffled."""
    lengths = lengths or [ctx] * B
    per = -(-max(lengths) // bs)
    NB = sum(-(-n // bs) for n in lengths) + 1
    g = torch.Generator(device="cuda").manual_seed(B * ctx)
    kc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).bfloat16()
    vc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).bfloat16()
    blocks = (torch.randperm(NB - 1, device="cuda", generator=g) + 1).int().tolist()
    tables = torch.zeros(B, per, dtype=torch.int32)
    for b, n in enumerate(lengths):
        k = -(-n // bs)
        tables[b, :k] = torch.tensor(blocks[:k], dtype=torch.int32)
        blocks = blocks[k:]
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", generator=g).bfloat16()
    return q, kc, vc, tables.cuda(), lens


def serving_lengths(B, seed=0):
    """Key counts as in `bench throughput`'s running batch: log-normal, median 1100, sigma
    0.8, capped at 8700 (prompt up to 8192 plus output up to 512)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(B).log_normal_(math.log(1100), 0.8, generator=g)
    return [max(1, min(8700, int(v))) for v in x.tolist()]


def schedules(P, H, Hkv, D, bs):
    """How keys are spread over CTAs: the old uniform S (every sequence cut into S equal
    splits, S from occupancy alone) against per-sequence splits, longest first or not."""
    shapes = [(B, ctx, None) for B, ctx in ((64, 2048), (256, 1024), (16, 4096))] \
        + [(B, 0, serving_lengths(B)) for B in (256, 100, 16)]
    print("\n## schedules: S CTAs per sequence and keys per split; µs per call, TB/s of KV "
          "read (columns: batch x keys, 'serving' = log-normal lengths)\n")
    print("| schedule | " + " | ".join(f"{B} x {ctx or 'serving'}" for B, ctx, _ in shapes)
          + " |")
    print("|" + " --- |" * (len(shapes) + 1))
    cases = [case(B, ctx or 1, H, Hkv, D, bs, lengths) for B, ctx, lengths in shapes]
    group = P.head_group(H, Hkv)
    plans = [("uniform S (old)", lambda B, lens: dict(splits=P.num_splits(B, H // group, 0),
                                                      split_keys=1)),
             ("per-sequence splits, longest first (default)",
              lambda B, lens: dict(order=P.longest_first(lens))),
             ("per-sequence splits, in order", lambda B, lens: dict()),
             ("uniform S, longest first", lambda B, lens: dict(
                 splits=P.num_splits(B, H // group, 0), split_keys=1,
                 order=P.longest_first(lens))),
             ("S >= 8, longest first", lambda B, lens: dict(
                 splits=max(8, P.split_plan(B, H // group, 0)[0]),
                 split_keys=P.split_plan(B, H // group, 0)[1], order=P.longest_first(lens))),
             ("twice the keys per split, longest first", lambda B, lens: dict(
                 split_keys=2 * P.split_plan(B, H // group, 0)[1], order=P.longest_first(lens))),
             ("occupancy S, per-sequence splits of 256, longest first", lambda B, lens: dict(
                 splits=P.num_splits(B, H // group, 0), split_keys=256,
                 order=P.longest_first(lens))),
             ("S >= 4, 1024 keys per split, longest first", lambda B, lens: dict(
                 splits=max(4, P.num_splits(B, H // group, 0)), split_keys=1024,
                 order=P.longest_first(lens))),
             ("S >= 4, 2048 keys per split, longest first", lambda B, lens: dict(
                 splits=max(4, P.num_splits(B, H // group, 0)), split_keys=2048,
                 order=P.longest_first(lens)))]
    scale = 1 / math.sqrt(D)
    # the check: the uniform schedule's output (the tests compare that one with the reference;
    # a float32 reference of these batches would need tens of GB)
    refs = [P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale, **plans[0][1](B, lens))
            .float() for (B, _, _), (q, kc, vc, tables, lens) in zip(shapes, cases)]
    for name, plan in plans:
        cells = []
        for (B, ctx, lengths), (q, kc, vc, tables, lens), ref in zip(shapes, cases, refs):
            kw = plan(B, lens)
            run = lambda: P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale,  # noqa
                                                        **kw)
            err = (run().float() - ref).abs().max().item()
            assert err < 2e-2, (name, B, err)
            t = graph_us(run)
            keys = sum(lengths) if lengths else B * ctx
            cells.append(f"{t:.1f} ({2 * keys * Hkv * D * 2 / (t * 1e-6) / 1e12:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def shared_case(B, prefixes, prefix_len, H, Hkv, D, bs, seed=0, consecutive=False):
    """B sequences, sequence b on prefix b % prefixes (as requests arrive), each prefix's
    blocks shared, then a suffix of its own (log-normal, median 200 keys). `consecutive`: each
    prefix's blocks in order (as the allocator hands a prompt's out), the rest shuffled."""
    g = torch.Generator().manual_seed(seed)
    suffix = [max(1, int(v)) for v in torch.empty(B).log_normal_(math.log(200), 0.6,
                                                                   generator=g).tolist()]
    per_prefix = prefix_len // bs
    NB = 1 + prefixes * per_prefix + sum(-(-n // bs) for n in suffix)
    blocks = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    if consecutive:
        n = prefixes * per_prefix
        blocks = list(range(1, n + 1)) + (torch.randperm(NB - 1 - n, generator=g) + n + 1).tolist()
    heads = [blocks[i * per_prefix:(i + 1) * per_prefix] for i in range(prefixes)]
    rest = blocks[prefixes * per_prefix:]
    M = per_prefix + max(-(-n // bs) for n in suffix)
    tables = torch.zeros(B, M, dtype=torch.int32)
    for b, n in enumerate(suffix):
        own, rest = rest[:-(-n // bs)], rest[-(-n // bs):]
        row = heads[b % prefixes] + own
        tables[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
    gc = torch.Generator(device="cuda").manual_seed(seed)
    kc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=gc).bfloat16()
    vc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=gc).bfloat16()
    q = torch.randn(B, H, D, device="cuda", generator=gc).bfloat16()
    lens = torch.tensor([prefix_len + n for n in suffix], dtype=torch.int32, device="cuda")
    return q, kc, vc, tables.cuda(), lens


def shared(P, H, Hkv, D, bs):
    """The CTAs' order where sequences share a cached prefix (10 prompts of 2,048 keys, each
    sequence's own keys after its prompt; or one prompt for all): as the batch comes and
    longest first (the engine's order). TB/s counts every key each sequence reads, shared or
    not: past the copy rate where L2 serves the shared keys."""
    shapes = ((64, 10), (256, 10), (256, 1))
    print("\n## shared prefixes: batch x prompts of 2,048 keys; µs per call (TB/s of keys "
          "read per sequence)\n")
    print("| order | " + " | ".join(f"{B} on {n}" for B, n in shapes) + " |")
    print("|" + " --- |" * (len(shapes) + 1))
    cases = [shared_case(B, n, 2048, H, Hkv, D, bs) for B, n in shapes]
    scale = 1 / math.sqrt(D)
    orders = [("as the batch comes", lambda tables, lens, NB: None),
              ("longest first (default)", lambda tables, lens, NB: P.longest_first(lens))]
    refs = [P.paged_decode_attention_cuda(q, kc, vc, tables, lens, scale).float()
            for q, kc, vc, tables, lens in cases]
    for name, make in orders:
        cells = []
        for (q, kc, vc, tables, lens), ref in zip(cases, refs):
            run = lambda: P.paged_decode_attention_cuda(  # noqa: E731
                q, kc, vc, tables, lens, scale, order=make(tables, lens, kc.shape[0]))
            assert (run().float() - ref).abs().max().item() < 2e-2, name
            t = graph_us(run)
            keys = int(lens.sum())
            cells.append(f"{t:.1f} ({2 * keys * Hkv * D * 2 / (t * 1e-6) / 1e12:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def cascade(P, H, Hkv, D, bs):
    """Shared prefixes read once (models/cascade.py: varlen flash over each prefix, the paged
    kernel over each sequence's own keys, merged) against the paged kernel reading every
    sequence's copy (longest first, the engine's order), 10 or 1 prompts of 2,048 keys."""
    import numpy as np

    from weavelm.models.cascade import (MAX_GROUPS, CascadeLayout, cascade_decode_attention,
                                        cascade_order, plan_cascade)
    shapes = ((64, 10), (256, 10), (256, 1), (512, 10))
    print("\n## cascade: batch x prompts of 2,048 keys; µs per call (TB/s of keys counted per "
          "sequence)\n")
    print("| attention | " + " | ".join(f"{B} on {n}" for B, n in shapes) + " |")
    print("|" + " --- |" * (len(shapes) + 1))
    scale = 1 / math.sqrt(D)
    plain_cells, casc_cells, speedups = [], [], []
    for B, n in shapes:
        q, kc, vc, tables, lens = shared_case(B, n, 2048, H, Hkv, D, bs, consecutive=True)
        host = plan_cascade(tables.cpu().numpy(), lens.cpu().numpy() - 1, bs)
        layout = CascadeLayout(B, MAX_GROUPS)
        buf = np.zeros(layout.size(B), dtype=np.int32)
        layout.fill(buf, host, B)
        plan = layout.views(torch.from_numpy(buf).cuda(), 8192)
        order, plain_order = cascade_order(lens, plan), P.longest_first(lens)
        plain = lambda: P.paged_decode_attention_cuda(  # noqa: E731
            q, kc, vc, tables, lens, scale, order=plain_order)
        casc = lambda: cascade_decode_attention(q, kc, vc, tables, lens, scale, plan,  # noqa
                                                order)
        err = (casc().float() - plain().float()).abs().max().item()
        assert err < 2e-2, err
        keys = 2 * int(lens.sum()) * Hkv * D * 2
        t_plain, t_casc = graph_us(plain), graph_us(casc)
        plain_cells.append(f"{t_plain:.1f} ({keys / (t_plain * 1e-6) / 1e12:.2f})")
        casc_cells.append(f"{t_casc:.1f} ({keys / (t_casc * 1e-6) / 1e12:.2f})")
        speedups.append(f"{t_plain / t_casc:.2f}x")
    for name, cells in (("paged kernel, every copy", plain_cells), ("cascade", casc_cells),
                        ("speed-up", speedups)):
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


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
