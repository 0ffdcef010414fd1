"""Will it fit? The memory a model (or a benchmark) needs per rank, estimated from its config
before anything is allocated, against what the machine has: `MemAvailable` of /proc/meminfo on
CPU (every rank shares it), each GPU's memory on CUDA.

N = TP degree, T = tokens of one step, D = hidden size, I = intermediate size, hd = head dim.
The estimate counts each rank's weight shards exactly (the TP layers' shapes), the KV cache of
T tokens, the activations of one prefill step of T tokens (a few [T, D] tensors and the MLP's
[T, 2I/N] and [T, I/N]) and each process's own footprint (torch itself, ~0.5 GB), so that a
refusal can say what would fit: how many layers, or how many tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from weavelm.errors import WeavelmError

PROCESS_BYTES = 512 << 20        # one rank's interpreter, torch and gloo/NCCL, before any tensor
GiB = 1 << 30


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Estimate:
    """Bytes one rank needs: fixed (embedding, LM head, process), per layer, per step token."""
    fixed: int
    per_layer: int
    per_token: int          # activations of one step, per token (all layers' KV included)
    layers: int
    tokens: int

    @property
    def per_rank(self) -> int:
        return self.fixed + self.per_layer * self.layers + self.per_token * self.tokens


def estimate(cfg, tp: int, dtype_bytes: int, tokens: int, kv_tokens: int | None = None,
             kv_cap: int | None = None) -> Estimate:
    """Bytes per rank for `cfg` (a ModelConfig) at TP `tp`: weights in a `dtype_bytes` type, a
    prefill step of `tokens` tokens and a KV cache of `kv_tokens` (default: `tokens`) tokens,
    at most `kv_cap` bytes (the CPU cache's fixed size)."""
    D, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    heads = _ceil_div(cfg.num_heads, tp)
    kv_heads = _ceil_div(cfg.num_kv_heads, tp)           # replicated when N exceeds them
    vocab = _ceil_div(cfg.vocab_size, tp)
    attn = D * (heads + 2 * kv_heads) * hd + heads * hd * D
    inter = _ceil_div(cfg.intermediate_size, tp)
    dense_mlp = 3 * D * inter
    moe_layers = len(cfg.moe_layers) if cfg.num_experts else 0
    moe_inter = _ceil_div(cfg.moe_intermediate_size or cfg.intermediate_size, tp)
    moe_mlp = cfg.num_experts * 3 * D * moe_inter + cfg.num_experts * D
    mlp = (dense_mlp * (L - moe_layers) + moe_mlp * moe_layers) // max(L, 1)
    per_layer = (attn + mlp + 2 * D) * dtype_bytes
    embeddings = vocab * D * (1 if cfg.tie_word_embeddings else 2) + D
    fixed = embeddings * dtype_bytes + PROCESS_BYTES
    kv = 2 * L * kv_heads * hd * dtype_bytes                 # one token's keys and values
    widest = max(inter, cfg.num_experts_per_tok * moe_inter if cfg.num_experts else 0)
    # A step's live activations: residual, hidden, norm output and the reduction buffers
    # ([T, D] each), q/k/v, and the MLP's gate-up, activation and product; 1.25x for the fp32
    # temporaries (llama3-8b, one layer, bf16 on CPU: 212 KB a token measured, 220 estimated).
    act = (6 * D + (heads + 2 * kv_heads) * hd + 4 * widest) * dtype_bytes * 5 // 4
    kv_total = kv * (kv_tokens if kv_tokens is not None else tokens)
    kv_share = min(kv_total, kv_cap if kv_cap is not None else kv_total) // max(tokens, 1)
    return Estimate(fixed, per_layer, act + kv_share, L, tokens)


def available_bytes(device: str) -> tuple[int, str] | None:
    """(bytes, where) that the ranks may use, or None when the machine does not say."""
    if device.startswith("cuda"):
        try:
            import torch
            props = torch.cuda.get_device_properties(0)
        except Exception:                           # noqa: BLE001 - no driver: checked elsewhere
            return None
        return props.total_memory, f"each GPU has {props.total_memory / GiB:.1f} GiB"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        kib = int(info["MemAvailable"].split()[0])
    except (OSError, KeyError, ValueError):
        return None
    return kib << 10, f"this machine has {kib / (1 << 20):.1f} GiB available (MemAvailable)"


def check_fits(est: Estimate, tp: int, device: str, what: str, budget: float = 1.0,
               layers_flag: str | None = None, tokens_flag: str | None = None) -> None:
    """Refuse, in one line with the estimate and what would fit, a run that cannot fit.

    On CPU the N ranks share the machine's memory; on GPUs each rank has its own (times
    `budget`, e.g. gpu_memory_utilization). `layers_flag`: the option that sets the number of
    layers (a benchmark's --layers), so the message can say how many would fit; `tokens_flag`
    the one that sets the tokens of a step (bench prefill's --tokens)."""
    if os.environ.get("WEAVELM_SKIP_MEMORY_CHECK") == "1":
        return
    found = available_bytes(device)
    if found is None:
        return
    have, where = found
    ranks = 1 if device.startswith("cuda") else tp
    have = int(have * budget)
    need = est.per_rank * ranks
    if need <= have:
        return
    scope = "per GPU" if device.startswith("cuda") else f"for {tp} rank{'s' * (tp > 1)}"
    fit = []
    per_rank = have // ranks

    def layers_at(tokens: int) -> int:
        return min((per_rank - est.fixed - est.per_token * tokens) // max(est.per_layer, 1),
                   est.layers - 1)
    if layers_flag and layers_at(est.tokens) >= 1:
        fit.append(f"{layers_flag} {layers_at(est.tokens)} fits at {est.tokens:,} tokens")
    tokens = (per_rank - est.fixed - est.per_layer * est.layers) // max(est.per_token, 1)
    if tokens >= 1 and est.tokens > 1:
        fits = min(tokens, est.tokens - 1)
        fit.append(f"{tokens_flag} up to {fits:,} fits at {est.layers} layers" if tokens_flag
                   else f"steps of {fits:,} tokens fit at {est.layers} layers")
    if layers_flag and not fit and est.tokens > 1024 and layers_at(1024) >= 1:
        fit.append(f"{layers_flag} {layers_at(1024)} {tokens_flag} 1024 fits" if tokens_flag
                   else f"{layers_flag} {layers_at(1024)} fits at 1,024 tokens")
    raise WeavelmError(
        f"{what} needs about {need / GiB:.1f} GiB {scope} ({est.per_rank / GiB:.1f} GiB a rank: "
        f"weights {(est.fixed - PROCESS_BYTES + est.per_layer * est.layers) / GiB:.1f}, "
        f"activations and KV cache {est.per_token * est.tokens / GiB:.1f}) but {where}: "
        f"{'; '.join(fit) or 'use a machine with more memory'} "
        f"(WEAVELM_SKIP_MEMORY_CHECK=1 skips this check)")
