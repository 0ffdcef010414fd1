"""`LLM`: load a model onto this rank's TP shard and generate text.

    from weavelm import LLM, SamplingParams
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", tp=1)
    print(llm.generate(["Hi!"], SamplingParams(max_new_tokens=32), chat=True)[0].text)

Under `torchrun --nproc-per-node N` (or `accelerate launch`) every rank builds the same `LLM`
with `tp=N` and calls `generate` with the same prompts; rank 0's sampler decides each token and
broadcasts it, so all ranks stay in step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from weavelm.engine.policy import SchedulePolicy
from weavelm.engine.sampler import SamplingParams, sample
from weavelm.engine.schedule import Executor, Mode, parse_mode
from weavelm.errors import WeavelmError, check
from weavelm.models.attention import AttentionBatch, Piece
from weavelm.models.config import ModelConfig
from weavelm.models.decoder import StepInput
from weavelm.models.loader import load_weights, resolve_model
from weavelm.models.registry import family_for
from weavelm.parallel.backends import make_communicator
from weavelm.parallel.state import get_state, init_parallel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Completion:
    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"     # "stop" (EOS), "length" (max_new_tokens or context)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    check(dtype in DTYPES, f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# torch.no_grad rather than inference_mode: on CPU, inference_mode sends grouped-query SDPA with
# a mask down a path ~100x slower (measured with torch 2.13).
class LLM:
    def __init__(self, model: str | None = None, tp: int | None = None,
                 device: str | None = None, dtype=None, max_model_len: int | None = None,
                 allow_pickle: bool = False, backend: str | None = None,
                 mode: str = "auto", progress: bool = True):
        source = resolve_model(model, allow_pickle=allow_pickle)
        self.source = source
        self._build(source.config, source, tp, device, dtype, max_model_len, backend, progress)
        self.mode = mode

    @classmethod
    def from_weights(cls, config: dict, weights, tp: int | None = None, device=None, dtype=None,
                     max_model_len: int | None = None, backend: str | None = None,
                     tokenizer=None, mode: str = "auto") -> "LLM":
        """An LLM from a Hugging Face config dict and (name, tensor) pairs already in memory,
        e.g. `LLM.from_weights(hf.config.to_dict(), hf.state_dict().items())`."""
        self = cls.__new__(cls)
        self.source = None
        self._build(config, weights, tp, device, dtype, max_model_len, backend, False)
        self._tokenizer = tokenizer
        self.mode = mode
        return self

    def _build(self, hf_config, weights, tp, device, dtype, max_model_len, backend, progress):
        self.config = ModelConfig.from_hf(hf_config)
        if tp is not None:
            self.config.check_tp(tp)
        state = init_parallel(tp, device)
        self.config.check_tp(state.world_size)      # a launcher may have set the degree
        self.state, self.device = state, state.device
        self.dtype = resolve_dtype(dtype, self.device)
        limit = self.config.max_position_embeddings
        check(max_model_len is None or 0 < max_model_len <= limit,
              f"max_model_len={max_model_len} is outside this model's context (1..{limit}): "
              f"lower it")
        self.max_model_len = max_model_len or limit
        self._tokenizer = None
        self.comm = make_communicator(backend, state)     # None: auto on GPUs at TP > 1
        cls = family_for(self.config.architecture).model_class
        with torch.no_grad():
            self.model = cls(self.config, dtype=self.dtype, device=self.device,
                             max_positions=self.max_model_len)
            load_weights(self.model, weights, progress=progress and state.is_first)
        self.model.eval()
        self.executor = Executor(self.model, self.comm)
        self._stop = None

    @property
    def mode(self) -> str | Mode:
        """The schedule setting: "auto" or a `Mode` (see `weavelm.engine.policy`)."""
        return "auto" if self.policy.auto else self.policy.mode

    @mode.setter
    def mode(self, mode) -> None:
        self.policy = SchedulePolicy(mode, self.config, self.state)

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (logits tests need none)."""
        if self._tokenizer is None:
            check(self.source is not None, "this LLM was built from in-memory weights without a "
                                           "tokenizer: pass tokenizer= or use token ids")
            from weavelm.models.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.source.path)
        return self._tokenizer

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end a sequence: EOS and the chat template's end-of-turn marker."""
        if self._stop is None:
            from weavelm.models.tokenizer import stop_token_ids
            try:
                tokenizer = self.tokenizer
            except WeavelmError:            # token-id-only use of a model without tokenizer files
                tokenizer = None
            self._stop = set(self.config.eos_token_ids)
            if tokenizer is not None:
                self._stop |= stop_token_ids(tokenizer, {"eos_token_id": self.config.eos_token_ids})
        return self._stop

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        from weavelm.models.tokenizer import apply_chat, encode
        ids = apply_chat(self.tokenizer, prompt) if chat else encode(self.tokenizer, prompt)
        check(len(ids) > 0, "the prompt is empty: give some text with -p")
        check(len(ids) < self.max_model_len,
              f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len}: "
              f"shorten the prompt")
        return ids

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: str | list[str], params: SamplingParams | None = None,
                 chat: bool = False, on_token: Callable[[int, int], None] | None = None
                 ) -> list[Completion]:
        """Generate for a batch of prompts of any lengths. `on_token(seq, token_id)` is called
        on rank 0 as each token is sampled (streaming)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        check(len(prompts) > 0, "no prompts given: pass at least one prompt")
        params = params or SamplingParams()
        token_lists = [self.encode(p, chat) for p in prompts]
        return self.generate_from_ids(token_lists, params, on_token, prompts)

    @torch.no_grad()
    def generate_from_ids(self, token_lists: list[list[int]], params: SamplingParams,
                          on_token=None, prompts: list[str] | None = None) -> list[Completion]:
        prompts = prompts or [""] * len(token_lists)
        B, dev = len(token_lists), self.device
        stop_ids = self.stop_ids      # may load the tokenizer: do it before any collective
        lengths = [len(t) for t in token_lists]
        for n in lengths:
            check(0 < n < self.max_model_len, f"a prompt has {n} tokens but the context holds "
                                              f"{self.max_model_len}: shorten the prompt")
        positions_needed = min(self.max_model_len, max(lengths) + params.max_new_tokens)
        cache = self.model.make_kv_cache(B, positions_needed)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=dev)
            generator.manual_seed(params.seed if params.seed is not None
                                  else int(torch.randint(0, 2**62, (1,))))
        outs = [Completion(p, list(t)) for p, t in zip(prompts, token_lists)]

        # Prefill: every prompt in one flat step.
        batch, positions = AttentionBatch.prefill(lengths, dev)
        ids = torch.tensor([t for toks in token_lists for t in toks], device=dev)
        last = torch.tensor([p.offset + p.length - 1 for p in batch.pieces], device=dev)
        mode, split = self.prefill_schedule(len(ids), lengths)
        hidden = self.executor.run(ids, StepInput(positions, cache, batch), mode, split)
        next_tokens = self._sample(hidden[last], params, generator)

        active = list(range(B))
        cur_len = list(lengths)
        while True:
            still = []
            for j, i in enumerate(active):
                tok = int(next_tokens[j])
                outs[i].token_ids.append(tok)
                if on_token is not None and self.state.is_first:
                    on_token(i, tok)
                if tok in stop_ids and not params.ignore_eos:
                    outs[i].finish_reason = "stop"
                elif len(outs[i].token_ids) < params.max_new_tokens \
                        and cur_len[i] < positions_needed:
                    still.append(i)
            active = still
            if not active:
                break
            pieces = [Piece(slot=i, start_pos=cur_len[i], length=1, offset=j)
                      for j, i in enumerate(active)]
            ids = torch.tensor([outs[i].token_ids[-1] for i in active], device=dev)
            positions = torch.tensor([cur_len[i] for i in active], device=dev)
            for i in active:
                cur_len[i] += 1
            step = StepInput(positions, cache, AttentionBatch.build(pieces, dev))
            hidden = self.executor.run(ids, step, self.policy.decode())
            next_tokens = self._sample(hidden, params, generator)

        if any(prompts):
            for o in outs:
                o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        return outs

    # -- schedules -----------------------------------------------------------------------------
    def prefill_schedule(self, num_tokens: int, seq_lens=None) -> tuple[Mode, int | None]:
        """(mode, split) the engine runs a prefill step of `num_tokens` tokens with."""
        return self.policy.prefill(num_tokens, seq_lens)

    def _sample(self, hidden, params, generator) -> torch.Tensor:
        logits = self.model.compute_logits(hidden, self.comm)      # [B, V]
        tokens = sample(logits, params, generator)
        # Rank 0 decides; the others follow, so ranks never diverge.
        return self.comm.broadcast(tokens.contiguous(), src=0)

    @torch.no_grad()
    def logits(self, token_lists: list[list[int]], mode=None, split: int | None = None
               ) -> torch.Tensor:
        """Logits [T, V] for every position of the given sequences (a fresh cache; tests use it).
        `mode`/`split` force a schedule; by default the prefill schedule is used."""
        lengths = [len(t) for t in token_lists]
        cache = self.model.make_kv_cache(len(token_lists), max(lengths))
        batch, positions = AttentionBatch.prefill(lengths, self.device)
        ids = torch.tensor([t for toks in token_lists for t in toks], device=self.device)
        if mode is None:
            mode, split = self.prefill_schedule(len(ids), lengths)
        elif parse_mode(mode) is Mode.WEAVE and split is None:
            split = SchedulePolicy(Mode.WEAVE, self.config, self.state).prefill(
                len(ids), lengths)[1]
        hidden = self.executor.run(ids, StepInput(positions, cache, batch), mode, split)
        return self.model.compute_logits(hidden, self.comm)


__all__ = ["LLM", "Completion", "SamplingParams", "WeavelmError", "get_state"]
