"""Mixture-of-experts families: Mixtral and Qwen3-MoE, a Llama decoder whose MLP is experts.

T = tokens, D = hidden size, E = experts, K = experts per token, I = expert intermediate size.

`SparseMoeBlock` replaces the dense MLP: a replicated router picks each token's top K experts
(`weavelm.kernels.moe.route`, the routing maths of transformers' Mixtral and Qwen3-MoE), and
the experts, every one split 1/N along I over the TP ranks (`weavelm.parallel.experts`), run as
grouped GEMMs over the tokens routed to them (for 1-8 tokens on a GPU, as GEMV kernels that
stream each active expert once: `weavelm.kernels.moe_gemv`). The block returns partial sums,
like a dense MLP, so every schedule (baseline, fused, weave) takes it unchanged: one reduction
per block.

Mixtral routes every layer through its experts (top-2 of 8, renormalised). Qwen3-MoE has
q/k norm, renormalises only with `norm_topk_prob`, and runs a dense MLP (`intermediate_size`)
in the layers listed in `mlp_only_layers` and in those not on its `decoder_sparse_step`.
"""
from __future__ import annotations

from torch import nn

from weavelm.errors import check
from weavelm.kernels.moe import moe_experts, route
from weavelm.models.config import ModelConfig
from weavelm.models.llama import (
    GGUF_BLOCK_NAMES, PACKED_MODULES, LlamaForCausalLM, LlamaMLP, _qwen_window, layer_gemms,
)
from weavelm.models.registry import GemmShape, ModelFamily, register_family
from weavelm.parallel.experts import (
    ExpertRowParallel, MergedExpertColumnParallel, ReplicatedLinear,
)
from weavelm.parallel.fp8 import fp8_moe_experts


class SparseMoeBlock(nn.Module):
    """x [T, D] (normed) -> partial sums [T, D] of the routed experts' weighted outputs."""

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        E, D, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = ReplicatedLinear(D, E, params_dtype=dtype, device=device)
        self.experts = nn.Module()            # `experts.w13.weight`, `experts.w2.weight`
        self.experts.w13 = MergedExpertColumnParallel(E, D, inter, params_dtype=dtype,
                                                      device=device)
        self.experts.w2 = ExpertRowParallel(E, inter, D, params_dtype=dtype, device=device)
        self.impl = "auto"                    # `moe_experts`' choice (benchmarks compare them)

    def forward(self, x, out=None):
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)   # [T, K] each
        w13, w2 = self.experts.w13, self.experts.w2
        if w13.weight_scale is not None:                                  # FP8 experts
            return fp8_moe_experts(x, w13.weight, w2.weight,
                                   (w13.weight_scale, w2.weight_scale), weights, ids, out)
        return moe_experts(x, w13.weight, w2.weight, weights, ids, out=out,
                           impl=self.impl)                                # [T, D] partial


class MoeForCausalLM(LlamaForCausalLM):
    """Llama attention (q/k norm where the config says so); experts in `cfg.moe_layers`."""

    @staticmethod
    def make_mlp(cfg: ModelConfig, i: int, dtype, device):
        if i in cfg.moe_layers:
            return SparseMoeBlock(cfg, dtype, device)
        return LlamaMLP(cfg, dtype, device)


def moe_layer_gemms(cfg: ModelConfig, tp: int) -> list[GemmShape]:
    """Attention's GEMMs, then the router and the two grouped expert GEMMs of an MoE layer (a
    model without MoE layers: the dense MLP's)."""
    dense = layer_gemms(cfg, tp)
    if not cfg.moe_layers:
        return dense
    E, K, inter = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size // tp
    return dense[:2] + [
        GemmShape(E, cfg.hidden_size, "router"),
        GemmShape(2 * inter, cfg.hidden_size, "experts_gate_up", experts=E, top_k=K),
        GemmShape(cfg.hidden_size, inter, "experts_down", experts=E, top_k=K)]


def _positive_int(hf: dict, name: str, value) -> int:
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"{hf['architectures'][0]} config: {name} must be a positive integer, got {value!r}")
    return value


def _experts(hf: dict, fields: dict, experts_key, inter_key: str) -> None:
    arch = fields["architecture"]
    E = _positive_int(hf, experts_key[0], next(
        (hf[k] for k in experts_key if hf.get(k) is not None), None))
    K = _positive_int(hf, "num_experts_per_tok", hf.get("num_experts_per_tok"))
    check(K <= E, f"{arch} config: num_experts_per_tok ({K}) exceeds the {E} experts")
    fields.update(num_experts=E, num_experts_per_tok=K,
                  moe_intermediate_size=_positive_int(hf, inter_key, hf.get(inter_key)))


def _mixtral(hf: dict, fields: dict) -> None:
    _experts(hf, fields, ("num_local_experts",), "intermediate_size")
    # transformers' MixtralConfig defaults, where they differ from Llama's (a config.json
    # without these fields means these values)
    if "rms_norm_eps" not in hf:
        fields["rms_norm_eps"] = 1e-5
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not (rope.get("rope_theta") or hf.get("rope_theta")):
        fields["rope_theta"] = 1e6
    fields.update(norm_topk_prob=True, moe_layers=list(range(fields["num_layers"])))


def _qwen3_moe(hf: dict, fields: dict) -> None:
    """transformers' rule: layer i is MoE unless listed in `mlp_only_layers`, when
    (i + 1) % decoder_sparse_step == 0."""
    _qwen_window(hf, fields)
    _experts(hf, fields, ("num_experts", "num_local_experts"), "moe_intermediate_size")
    step = _positive_int(hf, "decoder_sparse_step", hf.get("decoder_sparse_step", 1))
    only = hf.get("mlp_only_layers") or []
    check(isinstance(only, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                         for i in only),
          f"Qwen3MoeForCausalLM config: mlp_only_layers must be a list of layer indices, "
          f"got {only!r}")
    fields.update(norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                  moe_layers=[i for i in range(fields["num_layers"])
                              if i not in only and (i + 1) % step == 0])


MIXTRAL_PACKED = {
    "block_sparse_moe.experts.*.w1": ("mlp.experts.w13", 0),
    "block_sparse_moe.experts.*.w3": ("mlp.experts.w13", 1),
    "block_sparse_moe.experts.*.w2": ("mlp.experts.w2", None),
    "block_sparse_moe.gate": ("mlp.gate", None), **PACKED_MODULES}
# Expert patterns first: the dense `gate_proj` pattern would match an expert's too.
QWEN3_MOE_PACKED = {
    "experts.*.gate_proj": ("experts.w13", 0), "experts.*.up_proj": ("experts.w13", 1),
    "experts.*.down_proj": ("experts.w2", None), **PACKED_MODULES}
# llama.cpp stacks each projection of all experts in one tensor (`*`: one per expert).
MIXTRAL_GGUF_NAMES = {
    **GGUF_BLOCK_NAMES, "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.*.w1", "ffn_up_exps": "block_sparse_moe.experts.*.w3",
    "ffn_down_exps": "block_sparse_moe.experts.*.w2"}

register_family(ModelFamily(
    "MixtralForCausalLM", MoeForCausalLM, moe_layer_gemms, packed_modules=MIXTRAL_PACKED,
    config_hook=_mixtral, gguf_architecture="llama", gguf_moe=True, gguf_permute_qk=True,
    gguf_block_names=MIXTRAL_GGUF_NAMES))
register_family(ModelFamily(
    "Qwen3MoeForCausalLM", MoeForCausalLM, moe_layer_gemms, packed_modules=QWEN3_MOE_PACKED,
    config_flags={"qk_norm": True}, config_hook=_qwen3_moe))
