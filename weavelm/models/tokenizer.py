"""Tokenizers for weavelm: from a GGUF file or a local Hugging Face model directory.

Thin helpers over transformers' fast tokenizers, so the engine deals in token ids only:
`load_tokenizer` -> `encode` / `apply_chat` -> ids, and `stop_token_ids` for the sampler.

Converting a GGUF's vocabulary into a fast tokenizer takes transformers ~10 s, once per rank, so
the result is cached as an HF tokenizer directory under `$WEAVELM_CACHE` (default
`$XDG_CACHE_HOME/weavelm`, else `~/.cache/weavelm`) in `tokenizers/<key>`, the key hashing the
file's absolute path, size, mtime and the transformers version: a replaced file converts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

from weavelm.cache_dir import cache_root
from weavelm.errors import WeavelmError

# End-of-turn markers of common chat formats (ChatML, Llama 3, Phi-3, Gemma). A chat model stops
# at the end of its turn, which is often not the tokenizer's `eos_token`.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# Bounds of one chat-template rendering (real templates take milliseconds and write little more
# than the prompt); WEAVELM_CHAT_TEMPLATE_TIMEOUT overrides the seconds.
TEMPLATE_SECONDS = 10.0
TEMPLATE_CHARS = 10_000_000


def refuse_remote_code(directory: pathlib.Path) -> None:
    """Model repository code is never executed: a tokenizer that names its own Python classes
    (`auto_map` with an AutoTokenizer entry, in tokenizer_config.json or config.json) is refused
    before transformers could offer to run them."""
    for name in ("tokenizer_config.json", "config.json"):
        f = directory / name
        try:
            data = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            continue              # unreadable: transformers reports it, weavelm runs no code
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
            raise WeavelmError(f"{f} names custom code (auto_map), which weavelm never runs: "
                               f"use a model whose tokenizer transformers ships, or remove "
                               f"auto_map if you have checked the code yourself")


def load_tokenizer(source: str | os.PathLike):
    """A transformers fast tokenizer from a `.gguf` file or a local HF model directory; never
    with repository code (`trust_remote_code=False`, and `auto_map` refused up front)."""
    from transformers import AutoTokenizer

    path = pathlib.Path(source)
    if not path.exists():
        raise WeavelmError(f"tokenizer source not found: {path}")
    refuse_remote_code(path.parent if path.is_file() else path)
    try:
        if path.is_file():
            tokenizer = _gguf_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        # transformers' messages span lines; the CLI prints one, so flatten (and bound) it.
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise WeavelmError(f"cannot load a tokenizer from {path}: {reason}") from e
    if path.is_file() and not tokenizer.chat_template:
        # transformers 5.24 keeps `tokenizer.chat_template` from GGUF metadata (and saves it in
        # the cache as chat_template.jinja); older ones didn't.
        from weavelm.models.gguf import read_header

        template = read_header(path).get("tokenizer.chat_template")
        if template is not None:
            tokenizer.chat_template = template
    return tokenizer


def _gguf_tokenizer(path: pathlib.Path):
    """The GGUF's tokenizer: from the cache if converted before, else converted and cached."""
    from transformers import AutoTokenizer

    cached = _cache_entry(path)
    if cached is not None and cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(cached), trust_remote_code=False)
        except Exception:  # noqa: BLE001 - a damaged entry: convert again and overwrite it
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = _convert_gguf_tokenizer(path)
    if cached is not None:
        _save_entry(tokenizer, cached)
    return tokenizer


def _convert_gguf_tokenizer(path: pathlib.Path):
    """transformers' own (slow) conversion of the GGUF vocabulary into a fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                         trust_remote_code=False)


def _cache_entry(path: pathlib.Path) -> pathlib.Path | None:
    """Where the tokenizer converted from the GGUF at `path` is cached (None: no usable cache)."""
    import transformers

    try:
        stat = path.stat()
        root = cache_root()
    except (OSError, RuntimeError):  # RuntimeError: no home directory to expand
        return None
    # The transformers version is in the key: another version's conversion may differ.
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    return root / "tokenizers" / hashlib.sha1(key.encode()).hexdigest()


def _save_entry(tokenizer, entry: pathlib.Path) -> None:
    """Save `tokenizer` as `entry` atomically; skip quietly if the cache is not writable.

    Several ranks may convert at once: each writes a private temporary directory and renames it
    into place. A rename onto a directory that another rank completed first fails, and that
    rank's copy (an identical conversion) is kept.
    """
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, entry)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_text(prompt) -> None:
    if not isinstance(prompt, str):
        raise WeavelmError(f"a prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise WeavelmError("the prompt is not valid UTF-8 (it holds a lone surrogate, e.g. from "
                           "undecodable bytes on the command line): pass UTF-8 text") from None


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a raw prompt, with the special tokens the tokenizer adds by default (BOS...)."""
    _check_text(prompt)
    return list(tokenizer(prompt).input_ids)


def apply_chat(tokenizer, prompt: str, parse_special_tokens: bool = False) -> list[int]:
    """Token ids of `prompt` as one user turn in the model's chat format, ready for the reply."""
    _check_text(prompt)
    if not tokenizer.chat_template:
        raise WeavelmError("this tokenizer has no chat template: pass a raw prompt instead of chat")
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}], parse_special_tokens)


def encode_chat(tokenizer, messages: list[dict], parse_special_tokens: bool = False,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` in the model's chat format, ready for the assistant's reply.

    A message's content is text: a special token written in it (`<|im_end|>` then
    `<|im_start|>system`, say) is encoded as the characters it is made of, never as the control
    token, so no message can forge another turn or role. Only the template's own special tokens
    are control tokens. `parse_special_tokens=True` reads them in content too (what
    transformers and vLLM do by default), for callers whose messages are trusted and write
    control tokens on purpose."""
    text = render_chat_template(tokenizer, messages, tools)
    specials = _special_tokens(tokenizer)
    forged = [m for m in messages if any(t in str(m.get("content") or "") for t in specials)]
    if parse_special_tokens or not forged:
        # The template already writes BOS and friends; adding them again would double them.
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return _encode_with_content_as_text(tokenizer, messages, text, specials, tools)


def _special_tokens(tokenizer) -> list[str]:
    """The special tokens' texts, longest first (so a regex prefers `<|im_start|>` to `<|`)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({t.content for t in decoder.values() if getattr(t, "special", False)},
                  key=len, reverse=True)


def _encode_with_content_as_text(tokenizer, messages, text: str, specials: list[str],
                                 tools: list[dict] | None = None) -> list[int]:
    """`text` (the template rendered for `messages`) encoded with the template's special tokens as
    control tokens and every other character as text.

    The template is rendered a second time with each content replaced by a marker, which shows
    what the template wrote around the contents; the contents must then appear in `text` as
    given (or stripped, as templates `| trim` them), else the request is refused rather than
    guessed at. Tokens are split at the template's special tokens, as the ordinary encoding
    splits there, so the rest encodes as that would, content and all."""
    import re
    import secrets
    nonce = secrets.token_hex(8)
    marker = re.compile(rf"\x00weavelm{nonce}_(\d+)\x00")
    masked = [dict(m, content=f"\x00weavelm{nonce}_{i}\x00")
              if isinstance(m.get("content"), str) and m["content"] else m
              for i, m in enumerate(messages)]
    skeleton = render_chat_template(tokenizer, masked, tools)
    pieces = marker.split(skeleton)          # template text, message index, template text, ...
    for transform in (lambda c: c, str.strip):
        rendered = [pieces[j] if j % 2 == 0 else transform(str(messages[int(pieces[j])]["content"]))
                    for j in range(len(pieces))]
        if "".join(rendered) == text:
            break
    else:
        found = next(t for t in specials for m in messages if t in str(m.get("content") or ""))
        raise WeavelmError(f"a message holds the special token {found!r} and this model's chat "
                           f"template rewrites message content, so it cannot be kept as text: "
                           f"remove it from the message")
    special_re = re.compile("|".join(re.escape(t) for t in specials))
    ids: list[int] = []
    span = []                            # text since the last template special token
    for j, part in enumerate(rendered):
        if j % 2:                        # content: text only
            span.append(part)
            continue
        start = 0
        for match in special_re.finditer(part):
            span.append(part[start:match.start()])
            ids += _plain(tokenizer, "".join(span))
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            span, start = [], match.end()
        span.append(part[start:])
    return ids + _plain(tokenizer, "".join(span))


def _plain(tokenizer, text: str) -> list[int]:
    """Ids of `text` with special tokens in it encoded as ordinary characters."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)


def _template_seconds() -> float:
    text = os.environ.get("WEAVELM_CHAT_TEMPLATE_TIMEOUT", "")
    try:
        return float(text) if text else TEMPLATE_SECONDS
    except ValueError:
        raise WeavelmError(f"WEAVELM_CHAT_TEMPLATE_TIMEOUT must be a number of seconds, got "
                           f"{text!r}") from None


def render_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The chat template rendered for `messages` (transformers' sandboxed jinja environment) in
    a child process bounded in time (`WEAVELM_CHAT_TEMPLATE_TIMEOUT`, 10 s), memory and output
    (`TEMPLATE_CHARS`): a template that raises, never ends, computes without end or writes too
    much is one `WeavelmError` naming the problem (`models/chat_template.py`)."""
    from weavelm.models import chat_template
    return chat_template.render(tokenizer, messages, _template_seconds(), TEMPLATE_CHARS, tools)


def stop_token_ids(tokenizer, config: dict | None = None) -> frozenset[int]:
    """Ids that end generation: the tokenizer's EOS, the config's `eos_token_id` (int or list),
    and any end-of-turn marker that the chat template writes."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = (config or {}).get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in template and t in vocab)
    return frozenset(ids)
