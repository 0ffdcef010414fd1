"""FP8 (e4m3) weights for the TP linear layers: the scheme, its quantizers and its GEMM.

Scheme (vLLM's dynamic FP8): each weight row (output channel) of a rank's shard is scaled by its
own absolute maximum / 448 and rounded to float8_e4m3fn once, at load; each activation row
(token) is scaled and rounded the same way at every call; the product of the two FP8 operands,
accumulated in fp32, is multiplied by the token's and the channel's scales and written in the
activations' dtype (the fused communicator and the weave keep bf16 activations).

    with fp8_layers("fp8"):                  # what LLM(quantization="fp8") does around the build
        model = MyModel(...)                 # its TP linear layers hold float8 weights + scales
    y = fp8_linear(x, layer.weight, layer.weight_scale)

Where: on CUDA GPUs of compute capability 8.9 and up, `torch._scaled_mm` (cuBLASLt, FP8 tensor
cores) with row-wise scales; for up to 4 tokens (decode) weavelm's FP8 GEMV
(`kernels/fp8_gemv.py`), for 5 to MMA_MAX_TOKENS its FP8 tensor-core kernel
(`kernels/fp8_mma.py`) and on Hopper up to WGMMA_MAX_TOKENS its warpgroup kernel
(`kernels/fp8_wgmma.py`), all fed by one-pass activation rounding (`kernels/fp8_quant.py`);
elsewhere (CPU, older GPUs) the same rounding of x, then both
operands dequantized to fp32 for the matmul: the numbers the GPU path computes, up to the order
of the fp32 sums, so CPU tests cover loading, sharding and scales.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch

from weavelm.errors import check
from weavelm.kernels import fp8_gemv, fp8_mma, fp8_quant, fp8_wgmma, rmsnorm
from weavelm.kernels.activation import silu_and_mul
from weavelm.kernels.common import FP8, FP8_MAX, to_e4m3

METHODS = (None, "fp8")
# how layers hold FP8 weights: quantized at load ("fp8"), or loaded from an FP8 checkpoint with
# per-row / per-tensor scales ("fp8-channel") or 128 x 128 block scales ("fp8-block")
LAYER_FORMATS = (None, "fp8", "fp8-channel", "fp8-block")
BLOCK = 128
_MIN_SCALE = 1e-12                              # an all-zero row: scale 1e-12, codes 0

_building: contextvars.ContextVar = contextvars.ContextVar("weavelm_quantization", default=None)


def check_method(method) -> str | None:
    check(method in METHODS, f"quantization {method!r} is not supported: use 'fp8' or leave it "
                             f"unset (the checkpoint's dtype)")
    return method


@contextlib.contextmanager
def fp8_layers(method: str | None = "fp8"):
    """TP linear layers built inside hold their weights as `method` says (LAYER_FORMATS)."""
    check(method in LAYER_FORMATS, f"FP8 layer format {method!r} is not one of "
                                   f"{', '.join(map(str, LAYER_FORMATS[1:]))}")
    token = _building.set(method)
    try:
        yield
    finally:
        _building.reset(token)


def building_quantization() -> str | None:
    """The quantization of layers built now (`fp8_layers`), None: full precision."""
    return _building.get()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, K] (any float dtype) -> (codes [R, K] float8_e4m3fn, scales [R] float32) with
    codes * scales[:, None] ~ w: each row scaled by its absolute maximum / 448. In float32,
    or in float64 for a float64 w (weights rounded before, whose quotients often fall exactly
    between two FP8 values: float32's own rounding would pick the side)."""
    if w.is_cuda and w.dim() == 2:
        if fp8_quant.supported(w):                  # one pass instead of five torch ops
            return fp8_quant.quantize_rows_cuda(w)
    w = w if w.dtype == torch.float64 else w.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp_(min=_MIN_SCALE)
    return to_e4m3(w, scale[:, None]), scale.float()


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


# -- FP8 checkpoints ------------------------------------------------------------------------------
def checkpoint_format(cfg: dict, source: str = "config.json") -> str | None:
    """The layer format of a checkpoint's `quantization_config` (None: not quantized), or a
    one-line refusal of a scheme weavelm does not load. Read: Hugging Face's FP8 (`quant_method:
    "fp8"`, 128 x 128 block scales `weight_scale_inv`, dynamic activations: DeepSeek's and
    Qwen's) and compressed-tensors' float 8-bit weights with per-channel or per-tensor
    `weight_scale` (Neural Magic / Red Hat FP8 checkpoints; activations are scaled per token
    here, a static `input_scale` is not used)."""
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    if not q:
        return None
    method = q.get("quant_method")
    refuse = (f"{source}: this checkpoint is quantized with {method!r}, which weavelm does not "
              f"load: use its bf16/fp16 original (with --quantization fp8 to quantize at load)")
    if method == "fp8":
        block = q.get("weight_block_size")
        check(list(block or []) == [BLOCK, BLOCK] and q.get("fmt", "e4m3") == "e4m3",
              f"{source}: FP8 checkpoints load with weight_block_size [128, 128] in e4m3, got "
              f"{block!r} {q.get('fmt', 'e4m3')!r}: use a checkpoint in that layout")
        check(q.get("activation_scheme", "dynamic") == "dynamic",
              f"{source}: FP8 checkpoints with static activation scales are not supported: "
              f"use one with activation_scheme 'dynamic'")
        return "fp8-block"
    check(method == "compressed-tensors", refuse)
    if not q.get("config_groups") and q.get("kv_cache_scheme"):
        return None                           # only the KV cache is FP8: full-precision weights
    groups = list((q.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    check(bool(weights) and all(w.get("type") == "float" and w.get("num_bits") == 8
                                and w.get("strategy") in ("channel", "tensor")
                                for w in weights),
          f"{source}: compressed-tensors checkpoints load when their weights are float 8-bit "
          f"per channel or per tensor; this one's are {weights!r:.120}: use such a checkpoint")
    ignored = [n for n in q.get("ignore") or [] if n != "lm_head"]
    check(not ignored, f"{source}: this checkpoint keeps {ignored[0] if ignored else ''} "
                       f"unquantized, which weavelm does not load yet: use one that quantizes "
                       f"every linear layer but lm_head")
    return "fp8-channel"


def checkpoint_kv_scales(cfg: dict, source: str = "config.json") -> bool:
    """Whether the checkpoint carries a per-tensor FP8 scale for each layer's K and V
    (compressed-tensors `kv_cache_scheme`: tensors `self_attn.k_scale`, `self_attn.v_scale`),
    which an FP8 KV cache (`kv_cache_dtype="fp8"`) then divides by; a scheme of another kind
    is refused in one line."""
    q = cfg.get("quantization_config") or cfg.get("compression_config") or {}
    kv = q.get("kv_cache_scheme")
    if not kv:
        return False
    check(kv.get("type") == "float" and kv.get("num_bits") == 8
          and kv.get("strategy", "tensor") == "tensor" and not kv.get("dynamic", False),
          f"{source}: kv_cache_scheme {kv!r:.100} is not a static per-tensor FP8 scheme, the "
          f"one weavelm loads: use a checkpoint without it or with such a scheme")
    return True


def load_kv_scale(param, loaded, shard_id=None) -> None:
    """A checkpoint's K or V scale (one positive number, any TP rank) into `param`."""
    t = loaded if isinstance(loaded, torch.Tensor) else loaded[...]   # (0-dim: no [:])
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise ValueError(f"a KV-cache scale must be one number, got {t.dtype} "
                         f"{tuple(t.shape)}")
    value = float(t.reshape(()))
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"a KV-cache scale must be positive and finite, got {value}")
    param.data.fill_(value)


def check_codes(t: torch.Tensor, what: str) -> None:
    if t.dtype != FP8:
        raise ValueError(f"{what}: an FP8 checkpoint's weight must be float8_e4m3fn, got "
                         f"{t.dtype}")


def block_grid(shape) -> tuple[int, int]:
    """The 128 x 128 block scales of a [rows, cols] weight."""
    return -(-shape[0] // BLOCK), -(-shape[1] // BLOCK)


def _scale_tensor(loaded, what: str) -> torch.Tensor:
    t = loaded if isinstance(loaded, torch.Tensor) else loaded[...]   # (0-dim: no [:])
    if not t.is_floating_point() or t.dtype == FP8:
        raise ValueError(f"{what}: scales must be float32/bf16/fp16, got {t.dtype}")
    return t.float()


def store_row_scales(dst: torch.Tensor, loaded, total: int, start: int, what: str) -> None:
    """Rows start.. of a [total, 1] / [total] per-row scale tensor (or a per-tensor scale, []
    or [1], for every row) into dst."""
    t = _scale_tensor(loaded, what)
    if t.numel() == 1 and t.dim() <= 1:
        dst.fill_(t.reshape(()).item())
    elif tuple(t.shape) in ((total, 1), (total,)):
        dst.copy_(t.reshape(-1)[start:start + dst.shape[0]])
    else:
        raise ValueError(f"{what}: checkpoint scale has shape {tuple(t.shape)}, expected "
                         f"({total}, 1) per row or one per tensor")


def store_block_scales(dst: torch.Tensor, loaded, rows, cols, what: str) -> None:
    """This rank's 128 x 128 block scales (rows / cols as `_Linear._store_scales`) into dst;
    the shard must start on a block and end on one (or at the tensor's end)."""
    total, offset, size, start = rows
    width, col_start, ncols = cols
    t = _scale_tensor(loaded, what)
    if tuple(t.shape) != block_grid((total, width)):
        raise ValueError(f"{what}: checkpoint block scales have shape {tuple(t.shape)}, "
                         f"expected {block_grid((total, width))} for a {total} x {width} weight "
                         f"in {BLOCK} x {BLOCK} blocks")
    for name, first, n, end, at in (("rows", start, size, total, offset),
                                    ("columns", col_start, ncols, width, 0)):
        if first % BLOCK or at % BLOCK or (n % BLOCK and first + n != end):
            raise ValueError(f"{what}: this TP shard's {name} ({first}..{first + n}) do not "
                             f"fall on {BLOCK}-wide scale blocks: use a TP degree that splits "
                             f"the layer into multiples of {BLOCK}")
    r0, c0 = start // BLOCK, col_start // BLOCK
    nr, nc = -(-size // BLOCK), -(-ncols // BLOCK)
    dst[offset // BLOCK:offset // BLOCK + nr, :nc].copy_(t[r0:r0 + nr, c0:c0 + nc])


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [R, C] float8 with 128 x 128 block scales [ceil(R/128), ceil(C/128)] -> the
    weight, in the scales' dtype."""
    R, C = codes.shape
    full = scale.repeat_interleave(BLOCK, 0)[:R].repeat_interleave(BLOCK, 1)[:, :C]
    return codes.to(full.dtype) * full


_capabilities: dict = {}


def _capability(index) -> tuple[int, int]:
    """The GPU's compute capability, asked once per device (every FP8 call checks it)."""
    cap = _capabilities.get(index)
    if cap is None:
        cap = _capabilities[index] = torch.cuda.get_device_capability(index)
    return cap


def _scaled_mm_ok(x: torch.Tensor, codes: torch.Tensor, dtype=None) -> bool:
    if not x.is_cuda or (dtype or x.dtype) != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    # cuBLASLt FP8: sm_89+, inner and output sizes multiples of 16
    return _capability(x.device.index) >= (8, 9) and x.shape[-1] % 16 == 0 and codes.shape[0] % 16 == 0


# From this many tokens `_scaled_mm` accumulates with Hopper's fast FP8 mode (fewer promotions
# to fp32): at 2,048 tokens of Llama-3-8B's GEMMs 11-20% faster on an H100, its error against
# the exact product of the rounded operands 2-3e-3 instead of 1.7e-3 (rounding the operands
# costs 3.7%); below ~256 tokens it is no faster (bench_fp8_linear.py --gemv-sweep).
FAST_ACCUM_TOKENS = 256
# Up to this many tokens `fp8_mma` rather than `_scaled_mm` (0: never). H100, decode GPU ms a
# step with / without it: batch 8 5.49 / 5.87, 16 5.70 / 5.92, 32 6.70 / 6.12 (RESULTS.md, FP8
# tensor-core kernel): past 16 tokens cuBLASLt's Hopper kernels win.
MMA_MAX_TOKENS = 16
# Past MMA_MAX_TOKENS and up to this many, on Hopper (sm_90: wgmma), `fp8_wgmma` rather than
# `_scaled_mm`. 0 (off) until measured on a GPU: `--knob parallel.fp8.WGMMA_MAX_TOKENS=64`.
WGMMA_MAX_TOKENS = 0


# Whether the residual add + RMSNorm before an FP8 projection rounds its output to FP8 in the
# same kernel (`add_rms_norm_rounded`), where the projection would otherwise launch a rounding
# kernel of its own (decode at 2-64 tokens, prefill). The same codes either way. Off until
# measured on a GPU: `--knob parallel.fp8.NORM_ROUNDS=1`.
NORM_ROUNDS = False


class Rounded(NamedTuple):
    """Activations already rounded to FP8 a row (token), as `quantize_rows` rounds them, and
    the dtype they had (the product's): an FP8 layer takes them in place of x."""
    codes: torch.Tensor                      # [..., K] float8_e4m3fn
    scale: torch.Tensor                      # [...] float32
    dtype: torch.dtype


def silu_and_mul_rounded(x: torch.Tensor) -> Rounded:
    """`silu_and_mul(x)` rounded to FP8 a row: an FP8 down projection's input. On a GPU one
    kernel (`fp8_quant`, gated) instead of the activation's and the rounding's; the same codes."""
    if x.is_cuda and x.dim() == 2 and fp8_quant.supported(x, gated=True):
        return Rounded(*fp8_quant.quantize_rows_cuda(x, gated=True), x.dtype)
    h = silu_and_mul(x)
    codes, scale = quantize_rows(h.reshape(-1, h.shape[-1]))
    return Rounded(codes.reshape(h.shape), scale.reshape(h.shape[:-1]), x.dtype)


def gate_up_silu_rounded(x: torch.Tensor, gate_up) -> Rounded:
    """silu(gate) * up of a merged [gate | up] projection, rounded to FP8 a row: an FP8 down
    projection's input. One token on a GPU with an FP8 gate_up: the GEMV forms the product in
    its epilogue and `fp8_quant.round_spread` rounds it over many CTAs (no [gate | up] row in
    memory, no one-CTA rounding kernel); otherwise the layer, then `silu_and_mul_rounded`. The
    same codes either way."""
    codes, scale = gate_up.weight, getattr(gate_up, "weight_scale", None)
    if scale is not None and gate_up.bias is None and not isinstance(x, Rounded) \
            and x.dim() == 2 \
            and _scaled_mm_ok(x, codes) and fp8_gemv.gated_supported(x, codes):
        p, maxima = fp8_gemv.fp8_gemv_gated(x, codes, scale)
        return Rounded(*fp8_quant.round_spread(p, maxima), x.dtype)
    return silu_and_mul_rounded(gate_up(x))


def rounds_separately(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `fp8_linear(x, codes, ...)` rounds x in a step of its own (so the kernel before
    may round it instead): everywhere but where the GEMV rounds its one row itself."""
    x2 = x.reshape(-1, x.shape[-1])
    return not (x2.is_cuda and _scaled_mm_ok(x2, codes) and fp8_gemv.fused_supported(x2, codes))


def add_rms_norm_rounded(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[Rounded, torch.Tensor]:
    """`rmsnorm.fused_add_rms_norm` (residual updated in place) with its output rounded to FP8 a
    row: on a GPU in the norm's own kernel, elsewhere by `quantize_rows`; the codes and scales
    an FP8 layer would make of the bf16 output, bit for bit."""
    if x.is_cuda and x.dim() == 2 and rmsnorm.supported(x):
        codes, scale, residual = rmsnorm.fused_add_rms_norm_rounded_cuda(x, residual, weight,
                                                                         eps)
        return Rounded(codes, scale, x.dtype), residual
    y, residual = rmsnorm.fused_add_rms_norm(x, residual, weight, eps)
    codes, scale = quantize_rows(y.reshape(-1, y.shape[-1]))
    return Rounded(codes.reshape(y.shape), scale.reshape(y.shape[:-1]), x.dtype), residual


def fp8_linear(x, codes: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x [..., K] (or `Rounded` activations) -> x W^T (+ bias) [..., R] in x's dtype,
    W = codes * scale (rows), x rounded to FP8 per token. `out` receives the result where
    given."""
    rounded = isinstance(x, Rounded)
    src, dtype = (x.codes, x.dtype) if rounded else (x, x.dtype)
    lead, K = src.shape[:-1], src.shape[-1]
    x2 = src.reshape(-1, K)
    fast = _scaled_mm_ok(x2, codes, dtype)
    if fast and not rounded and fp8_gemv.fused_supported(x2, codes):
        y = fp8_gemv.fp8_gemv_fused(x2, codes, scale)     # a few tokens: x rounded in the GEMV
    else:
        xq, xs = (x2, x.scale.reshape(-1)) if rounded else quantize_rows(x2)
        if fast and fp8_gemv.supported(xq, codes, dtype):  # 1-4 tokens
            y = fp8_gemv.fp8_gemv_cuda(xq, xs, codes, scale, dtype)
        elif fast and xq.shape[0] <= MMA_MAX_TOKENS and fp8_mma.supported(xq, codes, dtype):
            y = fp8_mma.fp8_mma_cuda(xq, xs, codes, scale, dtype)
        elif fast and xq.shape[0] <= WGMMA_MAX_TOKENS and _capability(xq.device.index) == (9, 0) \
                and fp8_wgmma.supported(xq, codes, dtype):
            y = fp8_wgmma.fp8_wgmma_cuda(xq, xs, codes, scale, dtype)
        elif fast and xq.shape[0] > 0:
            y = torch._scaled_mm(xq, codes.t(), scale_a=xs[:, None], scale_b=scale[None, :],
                                 out_dtype=dtype,
                                 use_fast_accum=xq.shape[0] >= FAST_ACCUM_TOKENS)
        else:
            y = (dequantize_rows(xq, xs) @ dequantize_rows(codes, scale).t()).to(dtype)
    if bias is not None:
        y = y + bias
    y = y.reshape(*lead, codes.shape[0])
    return y if out is None else out.copy_(y)


def grouped_fp8_linear(a: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `a` [R, K] grouped by expert (offsets [E]: where expert e's rows end) times
    that expert's FP8 weight (codes [E, N, K], scale [E, N]) -> [R, N], each group through
    `fp8_linear` (its activations rounded per row, as a dense layer's). Reads the offsets on
    the host, except while a CUDA graph is captured: then every expert runs over all rows and
    each row keeps its own expert's result (fixed shapes, E times the work)."""
    if a.is_cuda and torch.cuda.is_current_stream_capturing():
        rows = torch.arange(a.shape[0], device=a.device, dtype=offsets.dtype)
        expert = torch.searchsorted(offsets, rows, right=True).unsqueeze(1)
        out = a.new_zeros(a.shape[0], codes.shape[1])
        for e in range(codes.shape[0]):
            out = torch.where(expert == e, fp8_linear(a, codes[e], scale[e]), out)
        return out
    out = a.new_empty(a.shape[0], codes.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            fp8_linear(a[start:end], codes[e], scale[e], out=out[start:end])
        start = end
    return out


def fp8_moe_experts(x, w13, w2, scales: tuple, weights, ids, out=None) -> torch.Tensor:
    """`kernels.moe.moe_experts` for FP8 experts (w13 [E, 2I, D], w2 [E, D, I] float8_e4m3fn,
    `scales` their per-row scales [E, 2I], [E, D]): rows sorted by expert, each expert's rows
    through `fp8_linear` (`grouped_fp8_linear`), the top-k weights in the combine."""
    from weavelm.kernels.moe import grouped_experts
    return grouped_experts(x, weights, ids, w13.shape[0],
                           lambda a, offs: grouped_fp8_linear(a, w13, scales[0], offs),
                           lambda a, offs: grouped_fp8_linear(a, w2, scales[1], offs), out)
