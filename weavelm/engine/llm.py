"""`LLM`: load a model onto this rank's TP shard and generate text.

    from weavelm import LLM, SamplingParams
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", tp=1)
    print(llm.generate(["Hi!"], SamplingParams(max_new_tokens=32), chat=True)[0].text)

Under `torchrun --nproc-per-node N` (or `accelerate launch`) every rank builds the same `LLM`
with `tp=N` and calls `generate` with the same prompts; rank 0's sampler decides each token and
broadcasts it, so all ranks stay in step. `LLM` is a thin front end: `llm.engine` is the
`LLMEngine` it drives, the same one `weavelm serve` drives.
"""
from __future__ import annotations

import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from weavelm.engine.config import EngineConfig, check_prompt
from weavelm.engine.engine import LLMEngine
from weavelm.engine.sampler import SamplingParams
from weavelm.weave.executor import Mode, parse_mode
from weavelm.weave.policy import SchedulePolicy
from weavelm.errors import WeavelmError, check
from weavelm.parallel.state import get_state


@dataclass
class Completion:
    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"     # "stop" (EOS), "length" (max_new_tokens or context)
    # With SamplingParams(logprobs=k) / (prompt_logprobs=k): a TokenLogprob per generated token
    # / per prompt token (the first None), each with its k most likely alternatives.
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0        # prompt tokens the prefix cache held (not computed)


def _engine_view(path: str, doc: str | None = None) -> property:
    """A read-only view of the engine's `path` (`LLM` is a front end over its engine)."""
    get = operator.attrgetter(path)
    return property(lambda self: get(self.engine), doc=doc or f"The engine's `{path}`.")


# torch.no_grad rather than inference_mode: on CPU, inference_mode sends grouped-query SDPA with
# a mask down a path ~100x slower (measured with torch 2.13).
class LLM:
    """A front end over one `LLMEngine`: `generate` adds every prompt as a request and steps
    the engine until all have finished. The keywords are `EngineConfig`'s, with vLLM's names:
    `tp`, `pp` (pipeline stages of `tp` ranks each), `device`, `dtype`, `max_model_len`,
    `gpu_memory_utilization` (the share of GPU memory weights + activations + KV cache may
    take), `max_num_seqs` (sequences in flight; also the largest captured decode batch),
    `max_num_batched_tokens` (tokens in one step),
    `enforce_eager` (no CUDA graphs), `num_kv_blocks` (fixes the cache size instead of
    measuring it), `block_size` (tokens per cache block), `seed` (the generator of requests
    without a seed of their own), `collective_timeout` (seconds a rank waits for its peers;
    default $WEAVELM_COLLECTIVE_TIMEOUT, else 30 on CPU, 300 on GPUs), `backend`, `mode`,
    `allow_pickle`."""

    def __init__(self, model: str | None = None, progress: bool = True, **options):
        self._start(LLMEngine.from_config(EngineConfig.from_keywords(model=model, **options),
                                          progress=progress))

    @classmethod
    def from_config(cls, config: EngineConfig, hf_config: dict | None = None, weights=None,
                    tokenizer=None, progress: bool = True) -> "LLM":
        """The LLM of an EngineConfig already built (and checked), e.g. by the CLI; the rest
        as `LLMEngine.from_config`."""
        self = cls.__new__(cls)
        self._start(LLMEngine.from_config(config, hf_config, weights, tokenizer, progress))
        return self

    @classmethod
    def from_weights(cls, config: dict, weights, tokenizer=None, **options) -> "LLM":
        """An LLM from a Hugging Face config dict and (name, tensor) pairs already in memory,
        e.g. `LLM.from_weights(hf.config.to_dict(), hf.state_dict().items())`, or a callable
        that fills the built model in place (each rank its own shard)."""
        return cls.from_config(EngineConfig.from_keywords(**options), config, weights,
                               tokenizer, progress=False)

    def _start(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._calls = 0
        self.stats: dict = {}
        # One generate at a time: a call steps the engine until its own requests finish, and
        # two threads stepping one engine would interleave their steps.
        self._generating = threading.Lock()

    # -- what the engine holds, under the names users know ------------------------------------
    config = _engine_view("model_config", "The model's config (`models.config.ModelConfig`).")
    runner = _engine_view("runner")
    model = _engine_view("model")
    comm = _engine_view("comm")
    state = _engine_view("state")
    device = _engine_view("device")
    dtype = _engine_view("model.param_dtype")
    max_model_len = _engine_view("max_model_len")
    policy = _engine_view("runner.policy")
    executor = _engine_view("runner.executor")
    tokenizer = _engine_view("tokenizer")
    stop_ids = _engine_view("stop_ids")
    source = _engine_view("source")

    @property
    def mode(self) -> str | Mode:
        """The schedule setting: "auto" or a `Mode` (see `weavelm.weave.policy`)."""
        return "auto" if self.policy.auto else self.policy.mode

    @mode.setter
    def mode(self, mode) -> None:
        """Change the schedule of later steps (captured decode graphs keep theirs)."""
        self.policy.set_mode(mode)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        from weavelm.models.tokenizer import apply_chat, encode
        ids = apply_chat(self.tokenizer, prompt) if chat else encode(self.tokenizer, prompt)
        check_prompt(len(ids), self.max_model_len)
        return ids

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prompt prefixes (vLLM's name); see LLMEngine.reset_prefix_cache."""
        return self.engine.reset_prefix_cache()

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: str | list[str], params=None, chat: bool = False,
                 on_token: Callable[[int, int], None] | None = None) -> list[Completion]:
        """Generate for a batch of prompts of any lengths; `params` is one SamplingParams for
        all, or one per prompt. `on_token(prompt index, token_id)` is called on rank 0 as each
        token is read (streaming)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        check(isinstance(prompts, (list, tuple)) and len(prompts) > 0
              and all(isinstance(p, str) for p in prompts),
              f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}: "
              f"pass token ids to generate_from_ids")
        token_lists = [self.encode(p, chat) for p in prompts]
        return self.generate_from_ids(token_lists, params, on_token, prompts)

    @staticmethod
    def _params_list(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        many = params if isinstance(params, (list, tuple)) else [params] * n
        check(len(many) == n, f"{len(many)} SamplingParams for {n} prompts: give one for all, "
                              f"or one per prompt")
        for p in many:
            check(isinstance(p, SamplingParams), f"params must be a SamplingParams, got "
                                                 f"{type(p).__name__}: use "
                                                 f"SamplingParams(**your_dict)")
        return list(many)

    @torch.no_grad()
    def generate_from_ids(self, token_lists: list[list[int]], params=None, on_token=None,
                          prompts: list[str] | None = None) -> list[Completion]:
        """Generate through the engine: every prompt is a request, and the engine is stepped
        until all have finished (continuous batching, chunked prefill, decode graphs)."""
        with self._generating:
            return self._generate_from_ids(token_lists, params, on_token, prompts)

    def _generate_from_ids(self, token_lists, params, on_token, prompts) -> list[Completion]:
        check(isinstance(token_lists, (list, tuple)) and len(token_lists) > 0,
              "no prompts given: pass a non-empty list of token-id lists")
        check(all(isinstance(t, (list, tuple)) for t in token_lists),
              f"a prompt must be a list of int token ids, got {token_lists!r:.80}")
        params = self._params_list(params, len(token_lists))
        engine = self.engine
        for toks, p in zip(token_lists, params):
            engine.check_request(list(toks), p)        # every refusal before any work
        prompts = prompts or [""] * len(token_lists)
        self._calls += 1
        ids = [f"generate-{self._calls}-{i}" for i in range(len(token_lists))]
        index = {rid: i for i, rid in enumerate(ids)}
        for rid, toks, p in zip(ids, token_lists, params):
            engine.add_request(rid, list(toks), p)
        t0 = time.perf_counter()
        self.stats = dict(ttft_s=None, decode_s=0.0, decode_tokens=0)
        emit = on_token if self.state.is_first else None
        final = {}
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id not in index:
                        continue                   # another caller's request (step API)
                    if out.finish_reason and out.finish_reason.startswith("error"):
                        raise WeavelmError(out.finish_reason[len("error: "):])
                    if self.stats["ttft_s"] is None and out.new_token_ids:
                        self.stats["ttft_s"] = time.perf_counter() - t0
                    if emit is not None:
                        for tok in out.new_token_ids:
                            emit(index[out.request_id], tok)
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                engine.abort_request(rid)           # nothing left behind after an error
        outs = []
        for rid, prompt, toks in zip(ids, prompts, token_lists):
            out = final[rid]
            outs.append(Completion(prompt, list(toks), list(out.token_ids), "",
                                   "stop" if out.finish_reason == "stop" else "length",
                                   out.logprobs, out.prompt_logprobs,
                                   out.num_cached_tokens))
        if self.stats["ttft_s"] is not None:
            self.stats["decode_s"] = time.perf_counter() - t0 - self.stats["ttft_s"]
            self.stats["decode_tokens"] = sum(len(o.token_ids) - 1 for o in outs)
        if any(prompts):
            for o in outs:
                o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        return outs

    # -- schedules -----------------------------------------------------------------------------
    def prefill_schedule(self, num_tokens: int, seq_lens=None) -> tuple[Mode, int | None]:
        """(mode, split) the engine runs a prefill step of `num_tokens` tokens with."""
        return self.policy.prefill(num_tokens, seq_lens)

    @torch.no_grad()
    def logits(self, token_lists: list[list[int]], mode=None, split: int | None = None
               ) -> torch.Tensor:
        """Logits [T, V] for every position of the given sequences: the model's own forward (a
        cache of its own, not the engine's). `mode`/`split` force a schedule; by default the
        prefill schedule the engine would pick, and the splitter's cut for the weave."""
        lengths = [len(t) for t in token_lists]
        if mode is None:
            mode, split = self.prefill_schedule(sum(lengths), lengths)
        elif parse_mode(mode) is Mode.WEAVE and split is None:
            split = SchedulePolicy(Mode.WEAVE, self.config, self.state).prefill(
                sum(lengths), lengths)[1]
        if self.state.num_stages > 1:      # through every stage; the last one's, on every rank
            return self.runner.all_logits(token_lists, parse_mode(mode), split)
        return self.model(token_lists, mode=mode, split=split, comm=self.comm)


__all__ = ["LLM", "Completion", "EngineConfig", "SamplingParams", "WeavelmError", "get_state"]
