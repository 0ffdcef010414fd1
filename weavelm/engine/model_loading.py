"""From an `EngineConfig` to this rank's model runner: the process group, the communicator, the
model built on this rank's shard with its weights loaded, the schedule policy and the runner
(`LLMEngine.from_config` calls `load_model`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from weavelm.engine.config import EngineConfig
from weavelm.engine.model_runner import ModelRunner
from weavelm.weave.policy import SchedulePolicy
from weavelm.errors import check
from weavelm.models.config import ModelConfig
from weavelm.models.loader import load_weights, resolve_model
from weavelm.models.registry import family_for
from weavelm.parallel.backends import make_communicator
from weavelm.parallel.fp8 import fp8_layers
from weavelm.parallel.state import ParallelState, arm_collective_timeout, init_parallel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Loaded:
    config: EngineConfig          # max_model_len resolved
    model_config: ModelConfig
    state: ParallelState
    comm: object
    runner: ModelRunner
    source: object                # the resolved checkpoint (None: built from weights in memory)

    def arm(self) -> None:
        """Every rank is loaded: from now on collectives wait only the collective timeout."""
        arm_collective_timeout(self.state)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    check(dtype in DTYPES, f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(config: EngineConfig, hf_config: dict | None = None, weights=None,
               progress: bool = True) -> Loaded:
    """`config.model` resolved and loaded; or, with `hf_config`, the model of that Hugging Face
    config dict filled from `weights` ((name, tensor) pairs, or a callable that fills the built
    model in place, each rank its own shard)."""
    source, where = None, "config"
    if hf_config is None:
        source = resolve_model(config.model, allow_pickle=config.allow_pickle)
        hf_config, weights, where = source.config, source, source.config_file
    model_config = ModelConfig.from_hf(hf_config, where)
    config = config.for_model(model_config)           # checked before any weight loads
    state = init_parallel(config.tp, config.device, config.collective_timeout, pp=config.pp)
    model_config.check_tp(state.world_size)           # a launcher may have set the degree
    dtype = resolve_dtype(config.dtype, state.device)
    check(config.kv_cache_dtype == "auto" or state.device.type == "cpu"
          or dtype in (torch.bfloat16, torch.float16),
          f"kv_cache_dtype='fp8' on GPUs goes with bf16 or fp16 models, this one runs in "
          f"{dtype}: use --dtype bfloat16, or drop --kv-cache-dtype")
    if state.num_ranks == 1:    # ranks started together would see each other's memory
        _check_memory(config, model_config, state.device, dtype)
    comm = make_communicator(config.backend, state)   # None: auto on GPUs at TP > 1
    cls = family_for(model_config.architecture).model_class
    with torch.no_grad():
        # linear layers: FP8 codes + scales, as the checkpoint has them or quantized at load
        with fp8_layers(model_config.quantization or config.quantization):
            model = cls(model_config, dtype=dtype, device=state.device,
                        max_positions=config.max_model_len)
        if callable(weights):      # an initialiser (benchmarks: random weights per shard)
            weights(model)
        else:
            load_weights(model, weights, progress=progress and state.is_first)
    model.eval()
    policy = SchedulePolicy(config.mode, model_config, state)
    runner = ModelRunner(model, comm, state, policy, config)
    return Loaded(config, model_config, state, comm, runner, source)


def _check_memory(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                  dtype: torch.dtype) -> None:
    """Refuse a model that cannot fit before any weight is allocated: on GPUs its weights
    and a full step (the KV cache gets the rest); on CPU its weights and a short step."""
    from weavelm.engine.memory import check_fits, estimate
    cuda = device.type == "cuda"
    # the runner's own floor: its largest step's activations and a cache of 2 blocks (or
    # the fixed cache asked for, which it allocates whatever the budget)
    step = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len) \
        if cuda else 16
    kv_tokens = (config.num_kv_blocks or 2) * config.block_size if cuda else None
    check_fits(estimate(model_config, 1, dtype.itemsize, step, kv_tokens=kv_tokens), 1,
               device.type, f"this model ({model_config.num_layers} layers, {dtype})",
               budget=config.gpu_memory_utilization if cuda and not config.num_kv_blocks
               else 1.0)
