"""`weavelm bench serve`: a bounded load generator against a running OpenAI-compatible server.

The workload is `bench throughput`'s (`throughput.workload`: seeded prompt token ids and output
lengths); each request is a streaming `/v1/completions` call with the prompt as token ids,
greedy, `max_tokens` = its output length and `ignore_eos`, so the server does the same work as
the engine does in `bench throughput`. At most `concurrency` requests are in flight; they
arrive as a Poisson process of `request_rate` per second (inf: as fast as the concurrency
allows). The whole run is bounded by `timeout_s`: requests still open then count as failed.

Reported: requests/s, input and output tokens/s over the run, p50 / p99 of the time to
first token (TTFT), time per output token after the first (TPOT) and end-to-end latency (E2E),
and the prefix-cache hit rate: the prompt tokens the server found cached (each response's
`usage.prompt_tokens_details.cached_tokens`, asked for with `stream_options.include_usage`)
over all prompt tokens.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time

from weavelm.bench.throughput import _percentiles, workload_from
from weavelm.errors import WeavelmError


CONSTRAINTS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "response_format", "structured_outputs")


async def _one(client, url: str, model: str, prompt: list[int], out_len: int,
               extra: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    first, tokens, error, cached = None, 0, None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            return dict(error=f"HTTP {r.status_code}: {text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"].get("message")
                break
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
            for choice in chunk.get("choices", ()):
                n = len(choice.get("token_ids") or ())
                if n and first is None:
                    first = time.perf_counter() - t0
                tokens += n
    e2e = time.perf_counter() - t0
    constrained = any(k in (extra or {}) for k in CONSTRAINTS)
    if error is None and (tokens != out_len if not constrained else tokens == 0):
        # (a constrained output may end before out_len: its grammar completes)
        error = f"{tokens} tokens streamed, {out_len} asked for"
    return dict(error=error, ttft=first, e2e=e2e, tokens=tokens, prompt=len(prompt),
                cached=cached or 0,
                tpot=(e2e - first) / (tokens - 1) if first is not None and tokens > 1 else None)


async def _load(url, model, requests, concurrency, rate, timeout_s, seed,
                extra: dict | None = None) -> tuple[list, float]:
    import httpx
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        try:
            r = await client.get(f"{url}/v1/models", timeout=30)
        except httpx.TransportError as e:
            raise WeavelmError(f"cannot reach a server at {url} ({type(e).__name__}): start "
                               f"`weavelm serve` first or check --url") from None
        if r.status_code != 200:
            raise WeavelmError(f"{url}/v1/models answered {r.status_code} ({r.text[:200]}): "
                               f"wait until the server is ready (GET /health)")
        model = model or r.json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)
        gaps = random.Random(seed)

        async def run(prompt, out_len):
            async with gate:
                try:
                    return await _one(client, url, model, prompt, out_len, extra)
                except Exception as e:                    # noqa: BLE001 - counted as failed
                    return dict(error=f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        tasks = []
        for prompt, out_len in requests:
            tasks.append(asyncio.create_task(run(prompt, out_len)))
            if math.isfinite(rate):
                await asyncio.sleep(gaps.expovariate(rate))
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, timeout_s -
                                                               (time.perf_counter() - t0)))
        for t in pending:
            t.cancel()
        elapsed = time.perf_counter() - t0
        results = [t.result() if t in done else dict(error="not finished within --timeout")
                   for t in tasks]
    return results, elapsed


def run_load(url: str, model: str | None, work: dict, concurrency: int, rate: float,
             timeout_s: float) -> dict:
    requests = workload_from(work, work["vocab"], work["seed"])
    results, elapsed = asyncio.run(_load(url, model, requests, concurrency, rate, timeout_s,
                                         work["seed"], work.get("extra")))
    ok = [r for r in results if r.get("error") is None]
    failed = [r for r in results if r.get("error") is not None]
    out_tokens = sum(r["tokens"] for r in ok)
    in_tokens = sum(r["prompt"] for r in ok)

    def pct(key):
        return _percentiles([r[key] for r in ok if r.get(key) is not None])
    return dict(url=url, requests=len(results), ok=len(ok), failed=len(failed),
                first_error=failed[0]["error"] if failed else None, concurrency=concurrency,
                request_rate=rate if math.isfinite(rate) else "inf", seed=work["seed"],
                elapsed_s=elapsed, requests_s=len(ok) / elapsed,
                input_tok_s=in_tokens / elapsed, output_tok_s=out_tokens / elapsed,
                prefix_hit_rate=sum(r["cached"] for r in ok) / in_tokens if in_tokens else 0.0,
                output_tokens=out_tokens, ttft=pct("ttft"), tpot=pct("tpot"), e2e=pct("e2e"))


def format_result(r: dict) -> str:
    def ms(pair):
        return "—" if pair[0] is None else f"{pair[0] * 1e3:.1f} / {pair[1] * 1e3:.1f}"
    return "\n".join([
        f"bench serve, {r['url']}, {r['requests']} requests (seed {r['seed']}), concurrency "
        f"{r['concurrency']}, request rate {r['request_rate']}/s",
        "",
        "| ok / failed | requests/s | input tok/s | output tok/s | TTFT p50 / p99 ms | "
        "TPOT p50 / p99 ms | E2E p50 / p99 ms | seconds | prefix hit rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['ok']} / {r['failed']} | {r['requests_s']:.2f} | {r['input_tok_s']:.0f} | "
        f"{r['output_tok_s']:.0f} | {ms(r['ttft'])} | {ms(r['tpot'])} | {ms(r['e2e'])} | "
        f"{r['elapsed_s']:.2f} | {r['prefix_hit_rate']:.3f} |",
        "",
        "prefix hit rate: prompt tokens the server found in its prefix cache / prompt tokens "
        "(usage.prompt_tokens_details.cached_tokens)"])
