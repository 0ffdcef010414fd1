"""The model-family registry is the only place a new family touches: a toy family defined in
this file (one model class + one `register_family` call) loads a tiny safetensors checkpoint at
TP 1 and 2 and gives the logits of a float64 reference computed here from the same tensors.
Its MLP keeps two experts in one parameter, so the packed-module table maps
`experts.<e>.up` to shard id (e, "up"): shard ids carry an expert index."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weavelm.models.decoder import WovenDecoder, WovenDecoderLayer, RMSNorm
from weavelm.models.registry import GemmShape, ModelFamily, register_family
from weavelm.parallel.launch import spawn
from weavelm.parallel.layers import (
    ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, TPLayer,
    copy_checked, narrow,
)

D, I, V, E, LAYERS = 16, 24, 37, 2, 2
CONFIG = dict(architectures=["ToyForCausalLM"], hidden_size=D, intermediate_size=I,
              num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
              vocab_size=V, rms_norm_eps=1e-6, max_position_embeddings=64, num_experts=E)


class ToyMixer(nn.Module):
    """A position-wise stand-in for attention: up (column-parallel), GELU, down (row-parallel)."""

    num_kv_heads, head_dim = 1, 2         # for the KV cache the engine allocates

    def __init__(self, dtype, device):
        super().__init__()
        self.up = ColumnParallelLinear(D, I, params_dtype=dtype, device=device)
        self.down = RowParallelLinear(I, D, params_dtype=dtype, device=device)

    def forward(self, x, step, out=None):
        return self.down(F.gelu(self.up(x)), out=out)


class ToyExperts(TPLayer):
    """E experts' up projections in one [E, I/N, D] parameter, every expert split 1/N along I
    (column-parallel); their outputs are summed, then one row-parallel down projection."""

    def __init__(self, dtype, device):
        super().__init__(dtype, device)
        rows = I // self.tp_size
        self.up = nn.Module()                 # holds `up.weight`, as the checkpoint names it
        self.up.weight = nn.Parameter(torch.empty(E, rows, D, dtype=dtype, device=self.device),
                                      requires_grad=False)
        self.up.weight.weight_loader = self.load_expert
        self.up.weight.shard_ids = [(e, "up") for e in range(E)]
        self.down = RowParallelLinear(I, D, params_dtype=dtype, device=device)

    def load_expert(self, param, loaded, shard_id):
        expert, _ = shard_id
        rows = param.shape[1]
        copy_checked(param.data[expert], narrow(loaded, 0, self.tp_rank * rows, rows), "expert")

    def forward(self, x, out=None):
        h = sum(F.silu(x @ self.up.weight[e].t()) for e in range(E))  # [T, I/N]
        return self.down(h, out=out)                                 # [T, D] partial sums


class ToyForCausalLM(WovenDecoder):
    def __init__(self, cfg, dtype=torch.float32, device="cpu", max_positions=None):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(V, D, params_dtype=dtype, device=device)
        self.model.layers = nn.ModuleList([
            WovenDecoderLayer(ToyMixer(dtype, device), ToyExperts(dtype, device),
                         RMSNorm(D, cfg.rms_norm_eps, dtype, device),
                         RMSNorm(D, cfg.rms_norm_eps, dtype, device))
            for _ in range(cfg.num_layers)])
        self.model.norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(V, D, params_dtype=dtype, device=device)


register_family(ModelFamily(
    "ToyForCausalLM", ToyForCausalLM,
    layer_gemms=lambda cfg, tp: [GemmShape(I // tp, D), GemmShape(D, I // tp)],
    packed_modules={"experts.*.up": ("up", "up")}))


def _checkpoint(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"model.embed_tokens.weight": torch.randn(V, D, generator=g),
         "model.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
         "lm_head.weight": torch.randn(V, D, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        w[p + "self_attn.up.weight"] = torch.randn(I, D, generator=g) / D ** 0.5
        w[p + "self_attn.down.weight"] = torch.randn(D, I, generator=g) / I ** 0.5
        for e in range(E):
            w[p + f"mlp.experts.{e}.up.weight"] = torch.randn(I, D, generator=g) / D ** 0.5
        w[p + "mlp.down.weight"] = torch.randn(D, I, generator=g) / I ** 0.5
    return w


def _reference_logits(w, ids) -> torch.Tensor:
    """The toy model in float64, straight from the checkpoint tensors."""
    w = {k: v.double() for k, v in w.items()}

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    h = w["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        h = h + F.gelu(x @ w[p + "self_attn.up.weight"].t()) @ w[p + "self_attn.down.weight"].t()
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        up = sum(F.silu(x @ w[p + f"mlp.experts.{e}.up.weight"].t()) for e in range(E))
        h = h + up @ w[p + "mlp.down.weight"].t()
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].t()


def _toy_logits(tp, path, seqs):
    from weavelm import LLM
    llm = LLM(str(path), tp=tp, device="cpu", progress=False)
    return llm.logits(seqs)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("toy")
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file(_checkpoint(), str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("tp", [1, 2])
def test_registered_toy_family_loads_and_matches_reference(toy_dir, tp):
    seqs = [[1, 5, 9, 36, 20], [4, 8]]
    got = spawn(_toy_logits, tp, tp, toy_dir, seqs) if tp > 1 else _toy_logits(1, toy_dir, seqs)
    ref = _reference_logits(_checkpoint(), torch.tensor([t for s in seqs for t in s]))
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_expert_shard_ids_come_from_the_packed_table(tmp_path):
    from safetensors.torch import save_file

    from weavelm import LLM
    from weavelm.errors import WeavelmError
    from weavelm.models.registry import family_for
    family = family_for("ToyForCausalLM")
    assert family.map_checkpoint_name("model.layers.1.mlp.experts.7.up.weight") == \
        ("model.layers.1.mlp.up.weight", (7, "up"))
    assert family.map_checkpoint_name("model.layers.1.mlp.down.weight") == \
        ("model.layers.1.mlp.down.weight", None)
    # an expert missing from the checkpoint is reported, not left uninitialised
    w = _checkpoint()
    del w["model.layers.0.mlp.experts.1.up.weight"]
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeavelmError, match="missing 1 tensors .*layers.0.mlp.up.weight"):
        LLM(str(tmp_path), tp=1, device="cpu", progress=False)
