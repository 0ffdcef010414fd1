"""Decode on one GPU: the paged decode-attention kernel equals its torch reference (bf16, fp16,
fp32; one and several key splits; a sliding window), and generation with CUDA-graph decode
gives the same tokens as eager decode, padded graph rows included."""
import math

import pytest
import torch

from tiny_models import make_tiny

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def _case(B, H, Hkv, D, bs, lens, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = sum(-(-n // bs) for n in lens)
    NB = need + 3
    kc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).to(dtype)
    vc = torch.randn(NB, bs, Hkv, D, device="cuda", generator=g).to(dtype)
    M = max(-(-n // bs) for n in lens) + 2
    order = (torch.randperm(NB - 1, device="cuda", generator=g) + 1).tolist()
    tables = torch.zeros(B, M, dtype=torch.int32)
    for b, n in enumerate(lens):
        for i in range(-(-n // bs)):
            tables[b, i] = order.pop()
    q = torch.randn(B, H, D, device="cuda", generator=g).to(dtype)
    return q, kc, vc, tables.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64),
                                     (torch.float32, 128), (torch.bfloat16, 256)])
@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize("kernel", ["mma", "lanes"])
def test_paged_kernel_matches_reference(dtype, D, splits, kernel):
    """The tensor-core kernel (bf16 / fp16 at head dim 64 / 128; `splits` is then its CTAs a
    head group; its plan made after and before the wait for the kernel before) and the lane
    kernel, 32 / 8 heads."""
    from weavelm.kernels import paged_attention as P
    lens = [1, 16, 17, 300, 1029, 77, 5]
    q, kc, vc, tables, lens_t = _case(len(lens), 32, 8, D, 16, lens, dtype, seed=D)
    if kernel == "mma" and not P.mma_supported(q, kc):
        pytest.skip("the tensor-core kernel takes bf16 / fp16 at head dim 64 / 128")
    scale = 1 / math.sqrt(D)
    for window in (None, 64):
        want = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens_t,
                                            scale, window)
        order = P.longest_first(lens_t) if splits is None else None
        for staged in (False, True) if kernel == "mma" else (False,):
            got = P.paged_decode_attention_cuda(q, kc, vc, tables, lens_t, scale, window,
                                                splits=splits, order=order, kernel=kernel,
                                                lens_staged=staged)
            torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_graph_decode_equals_eager_decode(tmp_path):
    from weavelm import LLM, SamplingParams
    # head dim 32: the smallest the paged decode kernel (and so graph decode) takes in bf16
    make_tiny("llama", tmp_path / "llama", seed=4, kv_heads=1, heads=2)
    prompts = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8], [30 + i for i in range(37)]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path / "llama"), tp=1, device="cuda", dtype="bfloat16",
                  progress=False, enforce_eager=eager, max_num_seqs=8)
        assert bool(llm.runner.graphs) is not eager
        tokens[eager] = [o.token_ids for o in llm.generate_from_ids(prompts, params)]
        # batch 3 replays the graph of 4 (one padded row): the same again, one prompt alone
        tokens[eager, "one"] = llm.generate_from_ids(prompts[:1], params)[0].token_ids
        assert llm.runner.blocks.num_free == llm.runner.blocks.capacity
        del llm
    assert tokens[False] == tokens[True]
    assert tokens[False, "one"] == tokens[True, "one"] == tokens[True][0]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])     # qwen3: q/k norm, head dim 24
def test_fp32_graph_decode_equals_transformers_greedy(tmp_path, kind):
    """The decode path's kernels (fused rotary + cache write, paged attention, SiLU-and-mul)
    inside CUDA graphs, in fp32: greedy tokens equal a transformers fp32 greedy loop."""
    from weavelm import LLM, SamplingParams
    model = make_tiny(kind, tmp_path / kind, seed=6, kv_heads=2).to("cuda")
    prompts = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8], [30 + i for i in range(37)]]
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(16):
                ids.append(int(model(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
            want.append(ids[len(p):])
    llm = LLM(str(tmp_path / kind), tp=1, device="cuda", dtype="float32", progress=False,
              max_num_seqs=4)
    got = llm.generate_from_ids(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in got] == want


def test_engine_steps_equal_transformers_greedy(tmp_path):
    """The step-level engine on a GPU, one step ahead of the host: prompts chunked into mixed
    steps, requests joining while others decode, decode-only steps replayed as CUDA graphs with
    the tokens the host has not read taken from the device, and a sequence stopping on EOS
    while its next step is in flight. fp32: greedy tokens equal a transformers greedy loop."""
    from weavelm import LLM, SamplingParams
    model = make_tiny("llama", tmp_path / "llama", seed=6, kv_heads=2).to("cuda")
    prompts = {"a": [1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], "b": [4, 8],
               "c": [30 + i for i in range(37)], "d": [2, 3, 5, 7, 11, 13]}
    new = 16
    want = {}
    with torch.no_grad():
        for name, p in prompts.items():
            ids = list(p)
            for _ in range(new):
                ids.append(int(model(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
            want[name] = ids[len(p):]
    stop_id = want["c"][5]
    llm = LLM(str(tmp_path / "llama"), tp=1, device="cuda", dtype="float32", progress=False,
              max_num_seqs=4, max_num_batched_tokens=16)
    runner, engine = llm.runner, llm.engine
    assert runner.graphs
    replays = []
    replay = runner._replay
    runner._replay = lambda *a: replays.append(a[1] is not None) or replay(*a)
    engine.stop_ids = {stop_id}
    params = SamplingParams(max_new_tokens=new)
    done = {}

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason)

    engine.add_request("a", prompts["a"], params)
    engine.add_request("b", prompts["b"], params)
    while len(engine.seqs["a"].read_token_ids) < 3:
        step()
    engine.add_request("c", prompts["c"], params)      # joins while a and b decode
    engine.add_request("d", prompts["d"], params)
    while engine.has_unfinished_requests():
        step()
    for name, tokens in want.items():
        if stop_id in tokens:
            n = tokens.index(stop_id) + 1
            assert done[name] == (tokens[:n], "stop"), name
        else:
            assert done[name] == (tokens, "length"), name
    assert any(replays)            # graph steps that took tokens from the device
    assert runner.blocks.num_free == runner.blocks.capacity


def test_logprobs_in_graph_decode_equal_transformers(tmp_path):
    """Logprobs read from the decode graphs' logits (and the prompt's from an eager prefill)
    equal transformers' log_softmax in float64 (float32 model), with graphs and without."""
    from transformers import AutoModelForCausalLM

    from weavelm import LLM, SamplingParams
    make_tiny("llama", tmp_path / "llama", seed=12, kv_heads=1, heads=2)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"),
                                              dtype=torch.float64).eval()
    prompts = [[5, 17, 33, 8, 9], [12, 19, 7], [61, 2, 90, 44, 3, 3, 9]]
    params = [SamplingParams(max_new_tokens=6, logprobs=4, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logprobs=1,
                             ignore_eos=True),
              SamplingParams(max_new_tokens=6, ignore_eos=True)]
    for eager in (False, True):
        llm = LLM(str(tmp_path / "llama"), tp=1, device="cuda", dtype="float32",
                  progress=False, enforce_eager=eager, max_num_seqs=8)
        assert bool(llm.engine.runner.graphs) is not eager
        outs = llm.generate_from_ids(prompts, params)
        for prompt, p, out in zip(prompts, params, outs):
            if p.logprobs is None:
                assert out.logprobs is None
                continue
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0], -1)
            for i, e in enumerate(out.logprobs):
                row = ref[len(prompt) - 1 + i]
                assert abs(e.logprob - row[e.token].item()) < 1e-3
                assert [t for t, _ in e.top] == row.topk(p.logprobs).indices.tolist()
            if p.prompt_logprobs is not None:
                for i in range(1, len(prompt)):
                    assert abs(out.prompt_logprobs[i].logprob - ref[i - 1][prompt[i]].item()) \
                        < 1e-3
        del llm


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_programmatic_dependent_launch_gives_the_plain_launches_tokens(tmp_path, monkeypatch,
                                                                       quantization):
    """Built and launched for programmatic dependent launch (the default on Hopper), the decode
    path's kernels give the greedy tokens and log-probabilities of plain launches, in CUDA
    graphs and eager (a kernel reading before its wait would read its predecessor's half-written
    output)."""
    from weavelm import LLM, SamplingParams
    from weavelm.kernels import (activation, fp8_gemv, fp8_mma, fp8_quant, launcher,
                                 paged_attention, rmsnorm, rope_cache)
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    make_tiny("llama", tmp_path / "llama", seed=5, kv_heads=2, heads=4, hidden_size=256,
              intermediate_size=512)
    # six sequences: FP8 projections through the tensor-core kernel (5-16 tokens), the split-K
    # counters included; at three and fewer, the GEMV
    prompts = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8], [30 + i for i in range(37)],
               [2, 3], [60 + 2 * i for i in range(20)], [11, 12, 13, 14, 15]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=2)
    runs = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("WEAVELM_PDL", pdl)
        for mod in (launcher, activation, fp8_gemv, fp8_mma, fp8_quant, paged_attention,
                    rmsnorm, rope_cache):     # plans built the other way must not be reused
            for name in ("_pdl", "_plans"):
                if isinstance(getattr(mod, name, None), dict):
                    monkeypatch.setattr(mod, name, {})
        if pdl == "1" and not launcher.pdl_enabled(0):
            pytest.skip("this cuda.core launches without programmatic dependent launch")
        assert launcher.pdl_enabled(0) is (pdl == "1")
        for eager in (False, True):
            llm = LLM(str(tmp_path / "llama"), tp=1, device="cuda", dtype="bfloat16",
                      progress=False, enforce_eager=eager, max_num_seqs=8,
                      quantization=quantization)
            outs = llm.generate_from_ids(prompts, params)
            runs[pdl, eager] = [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]
            del llm
    assert runs["1", False] == runs["0", False]
    assert runs["1", True] == runs["0", True]
