"""`LLM`: load a model onto this rank's TP shard and generate text.

    from weavelm import LLM, SamplingParams
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", tp=1)
    print(llm.generate(["Hi!"], SamplingParams(max_new_tokens=32), chat=True)[0].text)

Under `torchrun --nproc-per-node N` (or `accelerate launch`) every rank builds the same `LLM`
with `tp=N` and calls `generate` with the same prompts; rank 0's sampler decides each token and
broadcasts it, so all ranks stay in step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from weavelm.engine.block_manager import BLOCK_SIZE
from weavelm.engine.decode_loop import LookaheadDecoder, Running
from weavelm.engine.engine import LLMEngine
from weavelm.engine.model_runner import ModelRunner, RunnerConfig
from weavelm.engine.weave.policy import SchedulePolicy
from weavelm.engine.sampler import SamplingParams
from weavelm.engine.weave.executor import Mode, parse_mode
from weavelm.errors import WeavelmError, check
from weavelm.models.attention import prefill_batch
from weavelm.models.config import ModelConfig
from weavelm.models.decoder import StepInput
from weavelm.models.loader import load_weights, resolve_model
from weavelm.models.registry import family_for
from weavelm.parallel.backends import make_communicator
from weavelm.parallel.state import arm_collective_timeout, get_state, init_parallel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Completion:
    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"     # "stop" (EOS), "length" (max_new_tokens or context)


ENGINE_OPTIONS = ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
                  "enforce_eager", "num_kv_blocks", "block_size")


def runner_config(max_model_len: int, engine: dict) -> RunnerConfig:
    """RunnerConfig from the LLM's engine keywords, each checked with a one-line error."""
    unknown = sorted(set(engine) - set(ENGINE_OPTIONS))
    check(not unknown, f"unknown LLM option {unknown[0] if unknown else ''!r}: the engine "
                       f"options are {', '.join(ENGINE_OPTIONS)}")
    cfg = RunnerConfig(max_model_len=max_model_len, **engine)
    check(0 < cfg.gpu_memory_utilization <= 1, f"gpu_memory_utilization must be in (0, 1], "
                                               f"got {cfg.gpu_memory_utilization}")
    check(isinstance(cfg.max_num_seqs, int) and cfg.max_num_seqs >= 1,
          f"max_num_seqs must be a positive integer, got {cfg.max_num_seqs!r}")
    check(isinstance(cfg.max_num_batched_tokens, int) and cfg.max_num_batched_tokens >= 1,
          f"max_num_batched_tokens must be a positive integer, got "
          f"{cfg.max_num_batched_tokens!r}")
    check(isinstance(cfg.block_size, int) and cfg.block_size >= 1,
          f"block_size must be a positive integer, got {cfg.block_size!r}")
    return cfg


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
    """Engine options follow vLLM's names: `gpu_memory_utilization` (the share of GPU memory
    weights + activations + KV cache may take), `max_num_seqs` (sequences in flight; also the
    largest captured decode batch), `max_num_batched_tokens` (tokens in one prefill step),
    `enforce_eager` (no CUDA graphs). `num_kv_blocks` fixes the cache size instead of measuring
    it; `block_size` is the tokens per cache block (16). `collective_timeout` (seconds) bounds
    every wait of a rank for its peers (default: $WEAVELM_COLLECTIVE_TIMEOUT, else 30 on CPU)."""

    def __init__(self, model: str | None = None, tp: int | None = None,
                 device: str | None = None, dtype=None, max_model_len: int | None = None,
                 allow_pickle: bool = False, backend: str | None = None,
                 mode: str = "auto", progress: bool = True,
                 collective_timeout: float | None = None, **engine):
        source = resolve_model(model, allow_pickle=allow_pickle)
        self.source = source
        self._timeout = collective_timeout
        self._build(source.config, source, tp, device, dtype, max_model_len, backend, progress,
                    mode, engine, source.config_file)

    @classmethod
    def from_weights(cls, config: dict, weights, tp: int | None = None, device=None, dtype=None,
                     max_model_len: int | None = None, backend: str | None = None,
                     tokenizer=None, mode: str = "auto", collective_timeout: float | None = None,
                     **engine) -> "LLM":
        """An LLM from a Hugging Face config dict and (name, tensor) pairs already in memory,
        e.g. `LLM.from_weights(hf.config.to_dict(), hf.state_dict().items())`, or a callable
        that fills the built model in place (each rank its own shard)."""
        self = cls.__new__(cls)
        self.source, self._timeout = None, collective_timeout
        self._build(config, weights, tp, device, dtype, max_model_len, backend, False, mode,
                    engine)
        self._tokenizer = tokenizer
        return self

    def _build(self, hf_config, weights, tp, device, dtype, max_model_len, backend, progress,
               mode, engine: dict, source: str = "config"):
        if mode != "auto":
            parse_mode(mode)                  # a bad mode fails before any weight loads
        self.config = ModelConfig.from_hf(hf_config, source)
        if tp is not None:
            self.config.check_tp(tp)
        state = init_parallel(tp, device, getattr(self, "_timeout", None))
        self.config.check_tp(state.world_size)      # a launcher may have set the degree
        self.state, self.device = state, state.device
        self.dtype = resolve_dtype(dtype, self.device)
        limit = self.config.max_position_embeddings
        check(max_model_len is None or 0 < max_model_len <= limit,
              f"max_model_len={max_model_len} is outside this model's context (1..{limit}): "
              f"lower it")
        self.max_model_len = max_model_len or limit
        runner_cfg = runner_config(self.max_model_len, engine)    # checked before weights load
        if state.world_size == 1:   # ranks started together would see each other's memory
            self._check_memory(runner_cfg)
        self._tokenizer = None
        self.comm = make_communicator(backend, state)     # None: auto on GPUs at TP > 1
        cls = family_for(self.config.architecture).model_class
        with torch.no_grad():
            self.model = cls(self.config, dtype=self.dtype, device=self.device,
                             max_positions=self.max_model_len)
            if callable(weights):      # an initialiser (benchmarks: random weights per shard)
                weights(self.model)
            else:
                load_weights(self.model, weights, progress=progress and state.is_first)
        self.model.eval()
        self.policy = SchedulePolicy(mode, self.config, self.state)
        self.runner = ModelRunner(self.model, self.comm, state, self.policy,
                                  runner_cfg)
        self.executor = self.runner.executor
        self.engine = LLMEngine(self.runner, self.comm, set(), self.max_model_len)
        arm_collective_timeout(state)       # every rank is loaded: short waits from here on
        self._calls = 0
        self._stop = None
        self.stats: dict = {}

    def _check_memory(self, runner_cfg) -> None:
        """Refuse a model that cannot fit before any weight is allocated: on GPUs its weights
        and a full step (the KV cache gets the rest); on CPU its weights and a short step."""
        from weavelm.engine.memory import check_fits, estimate
        cuda = self.device.type == "cuda"
        rc = runner_cfg
        # the runner's own floor: its largest step's activations and a cache of 2 blocks (or
        # the fixed cache asked for, which it allocates whatever the budget)
        step = min(rc.max_num_batched_tokens, rc.max_num_seqs * rc.max_model_len) if cuda else 16
        kv_tokens = (rc.num_kv_blocks or 2) * rc.block_size if cuda else None
        check_fits(estimate(self.config, 1, self.dtype.itemsize, step, kv_tokens=kv_tokens), 1,
                   self.device.type, f"this model ({self.config.num_layers} layers, {self.dtype})",
                   budget=rc.gpu_memory_utilization if cuda and not rc.num_kv_blocks else 1.0)

    @property
    def mode(self) -> str | Mode:
        """The schedule setting: "auto" or a `Mode` (see `weavelm.engine.weave.policy`)."""
        return "auto" if self.policy.auto else self.policy.mode

    @mode.setter
    def mode(self, mode) -> None:
        """Change the schedule of later steps (captured decode graphs keep theirs)."""
        self.policy.set_mode(mode)

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
        check(isinstance(prompts, (list, tuple)) and len(prompts) > 0
              and all(isinstance(p, str) for p in prompts),
              f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}: "
              f"pass token ids to generate_from_ids")
        params = self._check_params(params)
        token_lists = [self.encode(p, chat) for p in prompts]
        return self.generate_from_ids(token_lists, params, on_token, prompts)

    @staticmethod
    def _check_params(params) -> SamplingParams:
        if params is None:
            return SamplingParams()
        check(isinstance(params, SamplingParams), f"params must be a SamplingParams, got "
                                                  f"{type(params).__name__}: use "
                                                  f"SamplingParams(**your_dict)")
        return params

    def _check_ids(self, token_lists) -> None:
        """Token ids: a non-empty list of non-empty lists of ints within the vocabulary."""
        vocab = self.config.vocab_size
        check(isinstance(token_lists, (list, tuple)) and len(token_lists) > 0,
              "no prompts given: pass a non-empty list of token-id lists")
        for toks in token_lists:
            check(isinstance(toks, (list, tuple)) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in toks),
                f"a prompt must be a list of int token ids, got {toks!r:.80}")
            bad = [t for t in toks if not 0 <= t < vocab]
            check(not bad, f"token id {bad[0] if bad else ''} is outside this model's "
                           f"vocabulary (0..{vocab - 1}): the tokenizer and model disagree")

    @torch.no_grad()
    def generate_from_ids(self, token_lists: list[list[int]], params: SamplingParams,
                          on_token=None, prompts: list[str] | None = None) -> list[Completion]:
        """Generate through the engine: every prompt is a request; continuous batching with
        chunked prefill while prompts are being admitted, then (once every running sequence
        is decoding and the cache can hold them all to the end) the decode loop one step ahead
        of the host."""
        self._check_ids(token_lists)
        params = self._check_params(params)
        prompts = prompts or [""] * len(token_lists)
        stop_ids = self.stop_ids      # may load the tokenizer: do it before any collective
        for toks in token_lists:
            check(0 < len(toks) < self.max_model_len,
                  f"a prompt has {len(toks)} tokens but the context holds {self.max_model_len}: "
                  f"shorten the prompt")
        engine = self.engine
        engine.stop_ids = stop_ids
        if not params.greedy:       # one stream for the whole call, as `seed` promises
            engine.generator.manual_seed(params.seed if params.seed is not None
                                         else int(torch.randint(0, 2**62, (1,))))
        self._calls += 1
        ids = [f"generate-{self._calls}-{i}" for i in range(len(token_lists))]
        index = {rid: i for i, rid in enumerate(ids)}
        for rid, toks in zip(ids, token_lists):
            engine.add_request(rid, toks, params)
        t0 = time.perf_counter()
        self.stats = dict(ttft_s=None, decode_s=0.0, decode_tokens=0)
        emit = (lambda i, tok: on_token(i, tok)) if on_token is not None and self.state.is_first \
            else None

        def take(outputs):
            for out in outputs:
                if out.finish_reason and out.finish_reason.startswith("error"):
                    raise WeavelmError(out.finish_reason[len("error: "):])
                if self.stats["ttft_s"] is None and out.new_token_ids:
                    self.stats["ttft_s"] = time.perf_counter() - t0
                if emit is not None:
                    for tok in out.new_token_ids:
                        emit(index[out.request_id], tok)

        try:
            while engine.has_unfinished_requests():
                if self._decode_ahead(engine, params, index, emit, take):
                    continue
                take(engine.step())
        finally:
            for rid in ids:
                engine.abort_request(rid)           # nothing left behind after an error
        outs = []
        for rid, prompt, toks in zip(ids, prompts, token_lists):
            seq = engine.seqs.pop(rid)
            out = Completion(prompt, list(toks), seq.output_token_ids)
            out.finish_reason = "stop" if seq.finish_reason == "stop" else "length"
            outs.append(out)
        if self.stats["ttft_s"] is not None:
            self.stats["decode_s"] = time.perf_counter() - t0 - self.stats["ttft_s"]
            self.stats["decode_tokens"] = sum(len(o.token_ids) - 1 for o in outs)
        if any(prompts):
            for o in outs:
                o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        return outs

    def _decode_ahead(self, engine, params, index, emit, take) -> bool:
        """Run the rest with `LookaheadDecoder` when that is safe: nothing waits, every running
        sequence is decoding, and the cache holds them all to their last token (so nothing can
        need preempting). False: take ordinary engine steps. The engine's step in flight is
        read first (its outputs go to `take`)."""
        sched, blocks = engine.scheduler, self.runner.blocks
        running = sched.running
        if sched.waiting or not running or any(s.num_uncomputed != 1 for s in running):
            return False

        def limits():
            return [min(self.max_model_len, len(s.prompt_token_ids) + params.max_new_tokens)
                    for s in running]

        need = sum(max(0, blocks.blocks_for(lim - 1) - len(s.blocks))
                   for s, lim in zip(running, limits()))
        if need > blocks.num_free:
            return False
        take(engine.settle())             # (sequences may only end here: the blocks suffice)
        running = list(sched.running)
        if not running:
            return True
        views = [Running(len(s.prompt_token_ids), s.output_token_ids, s.blocks, lim)
                 for s, lim in zip(running, limits())]
        stream = None if emit is None else \
            (lambda row, tok: emit(index[running[row].request_id], tok))
        decoder = LookaheadDecoder(self.runner, self.comm, params, engine.generator,
                                   lambda tok: tok in engine.stop_ids and not params.ignore_eos,
                                   stream)
        decoder.run(views, blocks.grow)
        for s in list(running):
            s.num_computed = s.num_tokens - 1
            last = s.output_token_ids[-1]
            stopped = last in engine.stop_ids and not params.ignore_eos
            sched.finish(s, "stop" if stopped else "length")
        return True

    # -- schedules -----------------------------------------------------------------------------
    def prefill_schedule(self, num_tokens: int, seq_lens=None) -> tuple[Mode, int | None]:
        """(mode, split) the engine runs a prefill step of `num_tokens` tokens with."""
        return self.policy.prefill(num_tokens, seq_lens)

    @torch.no_grad()
    def logits(self, token_lists: list[list[int]], mode=None, split: int | None = None
               ) -> torch.Tensor:
        """Logits [T, V] for every position of the given sequences (a cache of their own, not
        the engine's; tests use it).
        `mode`/`split` force a schedule; by default the prefill schedule is used."""
        lengths = [len(t) for t in token_lists]
        batch, positions, num_blocks = prefill_batch(lengths, BLOCK_SIZE, self.device)
        cache = self.model.make_kv_cache(num_blocks, BLOCK_SIZE)
        ids = torch.tensor([t for toks in token_lists for t in toks], device=self.device)
        if mode is None:
            mode, split = self.prefill_schedule(len(ids), lengths)
        elif parse_mode(mode) is Mode.WEAVE and split is None:
            split = SchedulePolicy(Mode.WEAVE, self.config, self.state).prefill(
                len(ids), lengths)[1]
        hidden = self.executor.run(ids, StepInput(positions, cache, batch), mode, split)
        return self.model.compute_logits(hidden, self.comm)


__all__ = ["LLM", "Completion", "SamplingParams", "WeavelmError", "get_state"]
