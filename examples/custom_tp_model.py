"""A tensor-parallel model of one's own, built from weavelm's parallel layers and
`WovenDecoderLayer`, loaded from a Hugging Face-style checkpoint, run in every mode.

    torchrun --nproc-per-node 2 examples/custom_tp_model.py --device cpu   # CPU over gloo
    torchrun --nproc-per-node 4 examples/custom_tp_model.py                # GPUs if present
    python examples/custom_tp_model.py --device cpu                        # TP 1

The model is no registered family: attention with separate q/k/v projections (with bias) and no
positional encoding (causal attention alone orders the tokens), a GELU MLP with bias, RMSNorm.
Every rank builds its shard (Megatron's column / row split), loads its slice of the checkpoint,
and runs a prefill in baseline, fused and weave modes (the weave's cut inside a sequence); the
logits must equal a single-process float64 reference of the same model.

B = sequences, T = tokens, D = hidden size, H = heads on this rank, Dh = head dim, F = MLP size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from weavelm import RMSNorm, WeavelmError, WovenDecoder, WovenDecoderLayer, load_weights
from weavelm.parallel import (
    ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, divide,
    destroy_parallel, get_state, init_parallel, make_communicator,
)

CONFIG = dict(vocab_size=96, hidden_size=64, num_heads=4, ffn_size=192, num_layers=3,
              eps=1e-5)


class NoPEAttention(nn.Module):
    """Multi-head causal attention, q/k/v column-parallel (each rank its heads), the output
    row-parallel: returns partial sums."""

    def __init__(self, c: dict, layer: int, dtype, device):
        super().__init__()
        D = c["hidden_size"]
        self.layer = layer
        self.num_heads = self.num_kv_heads = divide(c["num_heads"], get_state().world_size)
        self.head_dim = D // c["num_heads"]
        self.q_proj, self.k_proj, self.v_proj = (
            ColumnParallelLinear(D, D, bias=True, params_dtype=dtype, device=device)
            for _ in range(3))
        self.o_proj = RowParallelLinear(D, D, params_dtype=dtype, device=device)

    def forward(self, x, step, out=None):
        T = x.shape[0]
        q, k, v = (p(x).view(T, self.num_heads, self.head_dim)          # [T, H, Dh]
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = step.attend(q, k, v, self.layer, self.head_dim ** -0.5)      # [T, H, Dh]
        return self.o_proj(o.reshape(T, -1), out=out)                    # [T, D] partial sums


class GeluMLP(nn.Module):
    def __init__(self, c: dict, dtype, device):
        super().__init__()
        self.fc1 = ColumnParallelLinear(c["hidden_size"], c["ffn_size"], bias=True,
                                        params_dtype=dtype, device=device)
        self.fc2 = RowParallelLinear(c["ffn_size"], c["hidden_size"], bias=True,
                                     params_dtype=dtype, device=device)

    def forward(self, x, out=None):
        return self.fc2(F.gelu(self.fc1(x)), out=out)                   # [T, D] partial sums


class TinyGeluLM(WovenDecoder):
    """Hugging Face's layout (`model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`),
    so checkpoint names are parameter names."""

    def __init__(self, c: dict, dtype=torch.float32, device="cpu"):
        super().__init__()
        D, eps = c["hidden_size"], c["eps"]
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(c["vocab_size"], D, params_dtype=dtype,
                                                         device=device)
        self.model.layers = nn.ModuleList([
            WovenDecoderLayer(NoPEAttention(c, i, dtype, device), GeluMLP(c, dtype, device),
                              RMSNorm(D, eps, dtype, device), RMSNorm(D, eps, dtype, device))
            for i in range(c["num_layers"])])
        self.model.norm = RMSNorm(D, eps, dtype, device)
        self.lm_head = ParallelLMHead(c["vocab_size"], D, params_dtype=dtype, device=device)


def random_checkpoint(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights under Hugging Face-style names, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    D, Fs, V = c["hidden_size"], c["ffn_size"], c["vocab_size"]

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rnd(V, D, std=1.0), "model.norm.weight": 1 + rnd(D),
         "lm_head.weight": rnd(V, D, std=0.2)}
    for i in range(c["num_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            w[p + f"self_attn.{name}.weight"] = rnd(D, D, std=0.2)
            w[p + f"self_attn.{name}.bias"] = rnd(D)
        w[p + "self_attn.o_proj.weight"] = rnd(D, D, std=0.2)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = rnd(Fs, D, std=0.2), rnd(Fs)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = rnd(D, Fs, std=0.1), rnd(D)
        w[p + "input_layernorm.weight"] = 1 + rnd(D)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(D)
    return w


def reference_logits(w: dict, c: dict, seqs: list[list[int]]) -> torch.Tensor:
    """The same model in float64 on one process, written from its definition: [sum T, V]."""
    w = {k: v.double() for k, v in w.items()}
    H, eps = c["num_heads"], c["eps"]

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    out = []
    for s in seqs:
        x = w["model.embed_tokens.weight"][torch.tensor(s)]              # [T, D]
        T, D = x.shape
        for i in range(c["num_layers"]):
            p = f"model.layers.{i}."
            h = norm(x, w[p + "input_layernorm.weight"])
            q, k, v = (F.linear(h, w[p + f"self_attn.{n}.weight"], w[p + f"self_attn.{n}.bias"])
                       .view(T, H, -1).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [H, T, Dh]
            x = x + F.linear(o.transpose(0, 1).reshape(T, D), w[p + "self_attn.o_proj.weight"])
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            x = x + F.linear(F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                             w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        out.append(F.linear(norm(x, w["model.norm.weight"]), w["lm_head.weight"]))
    return torch.cat(out)


def save_checkpoint(w: dict, directory: str) -> None:
    """A Hugging Face-style checkpoint: config.json and model.safetensors."""
    from safetensors.torch import save_file
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["TinyGeluLM"], **CONFIG}, f)
    save_file(w, os.path.join(directory, "model.safetensors"))


def check_every_mode(model: TinyGeluLM, want: torch.Tensor, seqs: list[list[int]],
                     comm, tol: float) -> dict[str, float]:
    """Max |logits - reference| per mode; raises if one is off. The weave's cut falls inside
    the second sequence (its first half's K/V must be in the cache before the rest attends)."""
    split = len(seqs[0]) + len(seqs[1]) // 2
    errors = {}
    for mode in ("baseline", "fused", "weave"):
        got = model(seqs, mode=mode, split=split if mode == "weave" else None, comm=comm)
        errors[mode] = (got.double().cpu() - want).abs().max().item()
        if errors[mode] > tol:
            raise AssertionError(f"{mode}: logits differ from the float64 reference by "
                                 f"{errors[mode]:.2e} (tolerance {tol:.0e})")
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu or cuda [default: cuda if present]")
    args = ap.parse_args()
    state = init_parallel(int(os.environ.get("WORLD_SIZE", "1")), args.device)
    dtype = torch.float32
    w = random_checkpoint(CONFIG)
    with tempfile.TemporaryDirectory() as d:
        if state.is_first:
            save_checkpoint(w, d)
        if state.world_size > 1:                # every rank loads from rank 0's files
            torch.distributed.broadcast_object_list(obj := [d], src=0, group=state.group)
            d = obj[0]
        model = TinyGeluLM(CONFIG, dtype, state.device)
        load_weights(model, d)                  # each rank reads only its slice
        if state.world_size > 1:
            torch.distributed.barrier(group=state.group)   # rank 0 deletes the files after
    comm = make_communicator(None, state)
    seqs = [[5, 17, 33, 8, 61, 2, 90, 14, 3], [44, 3, 71, 9, 28, 50, 6, 11, 95, 35, 1],
            [12, 19, 7]]
    errors = check_every_mode(model, reference_logits(w, CONFIG, seqs), seqs, comm, tol=1e-4)
    if state.is_first:
        print(f"TP={state.world_size} ({state.device}): logits equal the single-process float64 "
              f"reference in every mode: " + ", ".join(f"{m} {e:.1e}" for m, e in errors.items()))
    # every rank is done before any leaves: a rank that exits while a peer still talks to it
    # can abort in gloo's teardown
    if state.world_size > 1:
        torch.distributed.barrier(group=state.group)
    destroy_parallel()


if __name__ == "__main__":
    try:
        main()
    except WeavelmError as e:                   # bad input: one line, no traceback
        sys.exit(f"error: {e}")
