"""Mixture-of-experts compute: routing, grouping tokens by expert, grouped GEMMs, the combine.

T = tokens, D = hidden size, E = experts, K = experts per token (top-k), I = expert
intermediate size on this rank (the full size / TP), R = T * K routed rows.

    route          router logits [T, E] -> top-k weights [T, K] (fp32), expert ids [T, K]
    moe_experts    x [T, D], w13 [E, 2I, D], w2 [E, D, I], weights, ids -> y [T, D]

`moe_experts` sorts the T * K (token, expert) pairs by expert, gathers the rows, and runs the
gate/up and the down projections as two grouped GEMMs (one GEMM per expert over its rows, the
groups given by cumulative row offsets); the top-k weights are applied in the combine (one
batched [1, K] x [K, D] product per token). Nothing on the way needs the routed counts on the
host: on a GPU with `torch._grouped_mm` (bf16, sm90+) the whole block runs without a host sync
and can be captured in a CUDA graph. Elsewhere the grouped GEMM is a loop of `mm` over the
experts (`grouped_mm_loop`), which reads the offsets on the host: the plain torch path on CPU,
and on GPUs without the grouped kernel (fp32, pre-Hopper) a path that syncs and cannot be
captured.

For 1-8 tokens on a GPU (decode) `moe_experts` runs two GEMV kernels instead (`moe_gemv`: each
active expert's weights streamed once, the expert ids read on the device), which read the
weights near the copy bandwidth where the grouped GEMMs reach half of it.

`moe_experts_reference` is the plain definition (per expert: its tokens, its MLP, weighted
sum), the tests' reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from weavelm.kernels.activation import silu_and_mul


def route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """logits [T, E] -> (weights [T, K] float32, ids [T, K] int64): softmax over all E experts
    in float32, the K largest, divided by their sum when `renormalize` (Mixtral always;
    Qwen3-MoE when `norm_topk_prob`)."""
    probs = torch.softmax(logits.float(), dim=-1)                    # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)                  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_by_expert(ids: torch.Tensor, num_experts: int):
    """ids [T, K] -> (order [R], offsets [E] int32): `order` lists the flat (token, slot)
    pairs expert by expert (stable), `offsets[e]` is where expert e's rows end. No host sync."""
    flat = ids.reshape(-1)                                           # [R]
    order = torch.argsort(flat, stable=True)                         # [R]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, torch.cumsum(counts, 0, dtype=torch.int32)        # [E]


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a [R, k], b [E, k, n], offsets [E] -> [R, n]: rows offsets[e-1]:offsets[e] times b[e]
    (a loop of mm over the experts that have rows; reads the offsets on the host, except while
    a CUDA graph is being captured, where it takes `grouped_mm_masked`)."""
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        return grouped_mm_masked(a, b, offsets)
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def grouped_mm_masked(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm_loop without reading the offsets on the host (inside CUDA graphs, for dtypes
    torch's grouped GEMM does not take): every expert's mm runs over all R rows and each row
    keeps its own expert's result — E times the FLOPs, fixed shapes, no sync. Decode steps are
    small and read every expert's weights anyway once the batch is large."""
    rows = torch.arange(a.shape[0], device=a.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets, rows, right=True).unsqueeze(1)   # [R, 1]
    out = a.new_zeros(a.shape[0], b.shape[2])
    for e in range(b.shape[0]):
        out = torch.where(expert == e, a @ b[e], out)
    return out


def grouped_mm_native_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes these operands on this device: CUDA, bf16,
    sm90 or newer, 16-byte aligned rows (its fallbacks elsewhere sync or are slow)."""
    if not (a.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return a.shape[1] % 8 == 0 and b.shape[2] % 8 == 0


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """a [R, k] x b [E, k, n] by groups of rows (offsets [E] int32, cumulative) -> [R, n].

    impl: "native" (torch._grouped_mm), "loop" (mm per expert) or "auto" (native where
    `grouped_mm_native_ok`, else loop)."""
    if impl == "auto":
        impl = "native" if grouped_mm_native_ok(a, b) else "loop"
    if impl == "native":
        return torch._grouped_mm(a, b, offs=offsets)
    return grouped_mm_loop(a, b, offsets)


IMPLS = ("auto", "gemv", "grouped", "native", "loop")


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor, out: torch.Tensor | None = None,
                impl: str = "auto") -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token t, written to `out`.

    x [T, D]; w13 [E, 2I, D] (gate rows, then up rows, per expert); w2 [E, D, I];
    weights [T, K]; ids [T, K] -> [T, D]. At TP > 1 each rank holds 1/N of every expert's I,
    so the result is this rank's partial sums.

    impl: "gemv" (the decode kernels of `moe_gemv`: 1..8 tokens on a GPU), "grouped" (sort,
    gather, grouped GEMMs: "native" torch._grouped_mm or "loop" of mm, as `grouped_mm` picks),
    "native" / "loop" (the grouped path with that GEMM), or "auto": gemv where it takes the
    operands (CUDA, T <= 8), else grouped. (FP8 experts: `parallel.fp8.fp8_moe_experts`.)"""
    if impl not in IMPLS:
        raise ValueError(f"moe_experts: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "gemv" or (impl == "auto" and x.is_cuda and x.shape[0] <= 8):
        from weavelm.kernels import moe_gemv
        why = moe_gemv.unsupported(x, w13, w2, weights, ids, out)
        if why is None:
            return moe_gemv.moe_gemv(x, w13, w2, weights, ids, out)
        if impl == "gemv":
            raise ValueError(f"moe_experts: impl='gemv' cannot take these operands: {why}")
    if impl in ("auto", "grouped", "gemv"):
        impl = "auto"
    return grouped_experts(x, weights, ids, w13.shape[0],
                           lambda a, offs: grouped_mm(a, w13.transpose(1, 2), offs, impl),
                           lambda a, offs: grouped_mm(a, w2.transpose(1, 2), offs, impl), out)


def grouped_experts(x, weights, ids, num_experts: int, gate_up, down, out=None):
    """The grouped path of `moe_experts` with its two products given: `gate_up(rows,
    offsets)` -> [R, 2I] and `down(h, offsets)` -> [R, D] over rows grouped by expert (the FP8
    experts of `parallel.fp8` pass their own)."""
    T, K = ids.shape
    order, offsets = group_by_expert(ids, num_experts)
    rows = x.index_select(0, order // K)                             # [R, D] grouped by expert
    h = silu_and_mul(gate_up(rows, offsets))                         # [R, I]
    y_sorted = down(h, offsets)                                      # [R, D]
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)   # [R, D], (token, slot)
    w = weights.to(y.dtype).view(T, 1, K)
    if out is None:
        out = x.new_empty(T, x.shape[1])
    torch.bmm(w, y.view(T, K, -1), out=out.view(T, 1, -1))          # [T, 1, D] combine
    return out


def moe_experts_reference(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, one expert at a time over the tokens routed to it (any dtype)."""
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in range(w13.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        g = F.linear(x[token], w13[e, :inter])
        u = F.linear(x[token], w13[e, inter:])
        y = F.linear(F.silu(g) * u, w2[e])
        out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
    return out
