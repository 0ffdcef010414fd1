"""The wave-aware token splitter: wave arithmetic, split choice, tuned tables, tuning (CPU, fast)."""
import json
import random

import pytest

from weavelm.bench.tune import candidate_splits, tune
from weavelm.weave.split_table import SplitTable, model_key, table_key
from weavelm.weave.splitter import Splitter
from weavelm.weave.wave_model import (
    GemmShape, choose_split, default_align, gemm_waves, modeled_time,
)
from weavelm.models.config import ModelConfig
from weavelm.models.registry import family_for


def llama_70b(**changes) -> ModelConfig:
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
              num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80,
              vocab_size=128256)
    return ModelConfig.from_hf({**hf, **changes})


LLAMA_70B = llama_70b()


def gemms_for(config: ModelConfig, tp: int) -> list[GemmShape]:
    """The family's per-layer GEMMs, as the registry gives them to the splitter."""
    return family_for(config.architecture).layer_gemms(config, tp)


def split_point_for(num_tokens, config, tp, *, gpu_name, num_sms, seq_lens=None,
                    min_tokens=None):
    """The engine's splitter on a named GPU; min_tokens None: the tuned table's threshold, else
    the wave model's default."""
    return Splitter(config, tp, gpu_name=gpu_name, num_sms=num_sms).split(
        num_tokens, seq_lens, min_tokens=min_tokens)
# Llama-70B's MLP at TP=8, the block TokenWeave's figure 9 times.
MLP_TP8 = [GemmShape(2 * 28672 // 8, 8192, "gate_up"), GemmShape(8192, 28672 // 8, "down")]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WEAVELM_CACHE", str(tmp_path))
    return tmp_path


def test_wave_arithmetic_by_hand():
    g = GemmShape(n=7168, k=8192)                  # 7168/256 = 28 tile columns
    assert gemm_waves(1280, g, 132) == 3           # 10 rows * 28 = 280 tiles -> ceil(280/132) = 3
    assert gemm_waves(640, g, 132) == 2            # 5 * 28 = 140 -> 2
    assert gemm_waves(512, g, 132) == 1            # 4 * 28 = 112 -> 1
    assert gemm_waves(129, g, 132) == 1            # 2 * 28 = 56 -> 1
    assert gemm_waves(0, g, 132) == 0
    assert gemm_waves(1280, GemmShape(n=300, k=1), 4) == 5   # 10 * ceil(300/256)=2 -> 20/4
    assert gemm_waves(100, GemmShape(n=100, k=1), 1, tile_m=64, tile_n=64) == 4  # 2 * 2 tiles
    # modeled time = sum of waves * k: 3 * 8192 + 3 * 3584
    assert modeled_time(1280, MLP_TP8, 132) == 3 * 8192 + 3 * 3584


def test_beats_naive_half_with_fewer_waves():
    # 1280 tokens: halves of 640 need 2 + 2 waves in each GEMM (4 vs 3 unsplit); 768 + 512 need
    # 2 + 1 = 3, as many as the unsplit batch. TokenWeave's tuned offset there is also +128.
    t = 1280
    s = choose_split(t, 8, MLP_TP8, 132)
    naive = modeled_time(640, MLP_TP8) * 2
    chosen = modeled_time(s, MLP_TP8) + modeled_time(t - s, MLP_TP8)
    assert chosen < naive
    assert chosen == modeled_time(t, MLP_TP8)
    assert s == 768
    waves = lambda m: sum(gemm_waves(m, g) for g in MLP_TP8)   # noqa: E731
    assert waves(s) + waves(t - s) < 2 * waves(640)


def test_ties_go_to_the_half():
    # 8192 tokens: 4096 + 4096 needs 7 + 7 and 8 + 8 waves, as many as the unsplit batch (14 and
    # 16); no split can do better, so among the equally good ones the tie-break keeps the half.
    assert choose_split(8192, 8, MLP_TP8) == 4096


@pytest.mark.parametrize("tp", [2, 3, 4, 8])
@pytest.mark.parametrize("t", [1024, 1025, 1280, 1792, 3000, 4097, 8192, 12345, 65536])
def test_aligned_and_balanced(tp, t):
    gemms = gemms_for(LLAMA_70B, tp)
    for imbalance in (0.25, 0.1):
        s = choose_split(t, tp, gemms, 132, max_imbalance=imbalance)
        assert s is not None and 0 < s < t
        assert s % tp == 0 and s % 8 == 0
        assert abs(s - t / 2) <= imbalance * t / 2


def test_custom_align_must_be_multiple_of_tp():
    assert choose_split(4096, 4, MLP_TP8, align=128) % 128 == 0
    with pytest.raises(ValueError):
        choose_split(4096, 3, MLP_TP8, align=8)


def test_below_min_tokens_no_split():
    assert choose_split(1023, 8, MLP_TP8) is None
    assert choose_split(0, 8, MLP_TP8) is None
    assert choose_split(1024, 8, MLP_TP8) is not None
    assert choose_split(1500, 8, MLP_TP8, min_tokens=2048) is None
    assert choose_split(512, 8, MLP_TP8, min_tokens=256) is not None


def test_table_override_nearest_bucket():
    table = SplitTable("k", {1024: {"split_offset": 0, "no_split": True},
                             4096: {"split_offset": 128, "no_split": False},
                             16384: {"split_offset": -256, "no_split": False}}, min_tokens=2048)
    assert choose_split(1500, 8, MLP_TP8, table=table) is None     # below the table's threshold
    assert choose_split(1500, 8, MLP_TP8, table=table, min_tokens=1024) is None  # bucket says no
    assert choose_split(4096, 8, MLP_TP8, table=table) == 2048 + 128
    assert choose_split(5000, 8, MLP_TP8, table=table) == 2500 + 128 + 4   # rounded to 8
    assert choose_split(8000, 8, MLP_TP8, table=table) == 4000 + 128       # log-nearer 4096
    assert choose_split(9500, 8, MLP_TP8, table=table) == 4750 - 256 + 2   # log-nearer 16384
    # an offset beyond the imbalance window is clamped into it
    far = SplitTable("k", {4096: {"split_offset": 2000, "no_split": False}}, min_tokens=1024)
    assert choose_split(4096, 8, MLP_TP8, table=far) == 2048 + 512
    never = SplitTable("k", {4096: {"split_offset": 0, "no_split": True}}, min_tokens=None)
    assert choose_split(65536, 8, MLP_TP8, table=never) is None


def test_table_save_load_roundtrip(cache_dir):
    key = table_key(model_key(LLAMA_70B), 8, "NVIDIA H100 80GB HBM3")
    assert SplitTable.load(key) is None
    table = SplitTable(key, {1024: {"split_offset": 128, "no_split": True},
                             8192: {"split_offset": -64, "no_split": False}}, min_tokens=2048,
                       meta={"measure_calls": 42})
    path = table.save()
    assert path.parent == cache_dir / "splits" and path.suffix == ".json"
    assert " " not in path.name and "/" not in path.stem
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temp file left
    loaded = SplitTable.load(key)
    assert loaded == table
    # unreadable cache: warned about and ignored
    path.write_text("{not json")
    with pytest.warns(UserWarning):
        assert SplitTable.load(key) is None


def test_model_key_and_gemms():
    assert model_key(LLAMA_70B) == "h8192-i28672-a64-kv8"
    assert model_key(llama_70b(num_hidden_layers=4)) == model_key(LLAMA_70B)  # layers: no
    assert model_key(llama_70b(head_dim=256)).endswith("-d256")
    g = {x.name: x for x in gemms_for(LLAMA_70B, 4)}
    assert (g["qkv"].n, g["qkv"].k) == ((64 + 2 * 8) * 128 // 4, 8192)
    assert (g["o"].n, g["o"].k) == (8192, 64 * 128 // 4)
    assert (g["gate_up"].n, g["gate_up"].k) == (2 * 28672 // 4, 8192)
    assert (g["down"].n, g["down"].k) == (8192, 28672 // 4)
    assert {x.name: x for x in gemms_for(LLAMA_70B, 16)}["qkv"].n == (4 + 2) * 128  # KV replicated


def test_split_point_for_uses_saved_table():
    assert split_point_for(1280, LLAMA_70B, 8, gpu_name="H100", num_sms=132) == \
        choose_split(1280, 8, gemms_for(LLAMA_70B, 8), 132)
    key = table_key(model_key(LLAMA_70B), 8, "H100")
    SplitTable(key, {1280: {"split_offset": -64, "no_split": False}}, min_tokens=1024).save()
    assert split_point_for(1280, LLAMA_70B, 8, gpu_name="H100", num_sms=132) == 640 - 64


def _synthetic(gemms, tp, step=64, comm=0.10, overhead=300.0, seed=0):
    """A fake prefill timer with a known optimum: the true best split is the model's choice + step
    (the model is a little off), splitting hides `comm` of the unsplit time and costs `overhead`."""
    rng = random.Random(seed)
    calls = []

    def measure(t, s):
        calls.append((t, s))
        noise = 1 + rng.uniform(0, 1e-4)
        if s is None:
            return t * (1 + comm) * noise
        target = choose_split(t, tp, gemms, min_tokens=0) + step
        return (t + overhead + 0.02 * t * abs(s - target) / step) * noise

    return measure, calls


def test_tune_finds_known_best_and_threshold():
    buckets = [1024, 2048, 4096, 8192, 16384]
    measure, calls = _synthetic(MLP_TP8, 8)
    table = tune(measure, buckets, 8, MLP_TP8, 132, candidates=5, repeats=3, key="synthetic")
    # splitting hides 10% and costs 300: it wins above 3000 tokens
    assert table.min_tokens == 4096
    for t in buckets:
        best = choose_split(t, 8, MLP_TP8, min_tokens=0) + 64
        assert table.entries[t]["split_offset"] == best - t // 2
        assert table.entries[t]["no_split"] == (t < 4096)
        # the tuned table reproduces the known best through choose_split
        if t >= 4096:
            assert choose_split(t, 8, MLP_TP8, table=table) == best
        else:
            assert choose_split(t, 8, MLP_TP8, table=table) is None
    assert len(calls) == table.meta["measure_calls"] <= len(buckets) * (1 + 5) * 3
    json.dumps(table.to_json())


def test_tune_threshold_needs_every_larger_bucket_to_win():
    buckets = [1024, 2048, 4096, 8192]
    base, _ = _synthetic(MLP_TP8, 8)

    def measure(t, s):   # a lone win at 1024 (below a loss at 2048) does not set the threshold
        return base(t, s) * (0.5 if (t == 1024 and s is not None) else 1)

    table = tune(measure, buckets, 8, MLP_TP8, candidates=3, repeats=1)
    assert table.entries[1024]["no_split"] is False
    assert table.entries[2048]["no_split"] is True
    assert table.min_tokens == 4096
    assert table.meta["measure_calls"] == len(buckets) * (1 + 3)

    never = tune(lambda t, s: 1.0 if s is None else 2.0, buckets, 8, MLP_TP8, repeats=1)
    assert never.min_tokens is None
    assert choose_split(8192, 8, MLP_TP8, table=never) is None


def test_candidates_are_few_aligned_and_in_window():
    for tp in (2, 3, 4, 8):
        gemms = gemms_for(LLAMA_70B, tp)
        for t in (1024, 1280, 5000, 65536):
            cands = candidate_splits(t, tp, gemms, candidates=5)
            assert 1 <= len(cands) <= 5 and len(set(cands)) == len(cands)
            assert cands[0] == choose_split(t, tp, gemms, min_tokens=0)
            assert all(c % tp == 0 and abs(c - t / 2) <= t / 8 for c in cands)
            # one candidate makes half A (the cheaper attention) larger by about T/8
            if t >= 5000:
                assert max(cands) > t / 2 + t / 8 - default_align(tp) - 1, (tp, t, cands)


def test_engine_auto_threshold_eager_default_or_tuned(cache_dir):
    """The engine's auto mode: no split below EAGER_MIN_TOKENS without a tuned table; the tuned
    table's own threshold when `weavelm tune` saved one; always a split when weave is forced;
    the baseline on CPU, where there is nothing to hide."""
    from types import SimpleNamespace

    import torch

    from weavelm.weave.policy import SchedulePolicy
    from weavelm.weave.executor import Mode
    from weavelm.weave.split_table import _cached_load
    from weavelm.weave.splitter import EAGER_MIN_TOKENS, current_gpu
    _cached_load.cache_clear()
    gpus = SimpleNamespace(device=torch.device("cuda"), world_size=4)
    auto = SchedulePolicy("auto", LLAMA_70B, gpus)
    assert auto.prefill(EAGER_MIN_TOKENS - 8) == (Mode.FUSED, None)
    mode, split = auto.prefill(EAGER_MIN_TOKENS)
    assert mode is Mode.WEAVE and 0 < split < EAGER_MIN_TOKENS
    assert auto.decode() is Mode.FUSED
    assert SchedulePolicy("weave", LLAMA_70B, gpus).prefill(1024)[0] is Mode.WEAVE
    cpu = SchedulePolicy("auto", LLAMA_70B, SimpleNamespace(device=torch.device("cpu"),
                                                            world_size=4))
    assert cpu.prefill(16384) == (Mode.BASELINE, None) and cpu.decode() is Mode.BASELINE
    key = table_key(model_key(LLAMA_70B), 4, current_gpu()[0])
    SplitTable(key, {2048: {"split_offset": 0, "no_split": False}}, min_tokens=2048).save()
    _cached_load.cache_clear()
    tuned = SchedulePolicy("auto", LLAMA_70B, gpus)
    assert tuned.prefill(2048)[0] is Mode.WEAVE and tuned.prefill(1024)[0] is Mode.FUSED


def test_causal_bias_moves_the_cut_up_for_one_long_sequence():
    """One sequence holding most of the batch: the wave model's window moves up by T/8 (half A's
    causal attention is the cheaper one), never beyond max_imbalance; many short sequences, or
    unknown lengths, keep the unbiased choice; a tuned table's offset is used as measured."""
    from weavelm.weave.wave_model import CAUSAL_BIAS, causal_bias
    assert causal_bias(4096, [4096]) == CAUSAL_BIAS
    assert causal_bias(4096, [3000, 1096]) == CAUSAL_BIAS
    assert causal_bias(4096, [1024] * 4) == 0.0 and causal_bias(4096, None) == 0.0
    for tp in (2, 4, 8):
        gemms = gemms_for(LLAMA_70B, tp)
        for t in (4096, 5000, 16384, 65536):
            plain = choose_split(t, tp, gemms, min_tokens=0)
            biased = choose_split(t, tp, gemms, min_tokens=0, bias=CAUSAL_BIAS)
            assert biased % tp == 0 and t / 2 - default_align(tp) <= biased <= t * 0.625
            assert biased >= plain or abs(plain - t / 2) > t / 16   # moved up, not down
            # the wave model still decides: the biased cut costs no more than any cut in reach
            cost = lambda s: modeled_time(s, gemms) + modeled_time(t - s, gemms)  # noqa: E731
            lo = -(-t // 2 // default_align(tp)) * default_align(tp)
            assert all(cost(biased) <= cost(s)
                       for s in range(lo, int(t * 0.625) + 1, default_align(tp)))
            assert split_point_for(t, LLAMA_70B, tp, gpu_name="none", num_sms=132,
                                   min_tokens=0, seq_lens=[t]) == biased
            assert split_point_for(t, LLAMA_70B, tp, gpu_name="none", num_sms=132,
                                   min_tokens=0, seq_lens=[t // 4] * 4) == plain
    # llama3-70b at TP=4, 4K and 8K: the measured best cut, T/2 + T/8
    assert choose_split(4096, 4, gemms_for(LLAMA_70B, 4), min_tokens=0, bias=CAUSAL_BIAS) == 2560
    assert choose_split(8192, 4, gemms_for(LLAMA_70B, 4), min_tokens=0, bias=CAUSAL_BIAS) == 5120
    with pytest.raises(ValueError):
        choose_split(4096, 4, gemms_for(LLAMA_70B, 4), bias=0.5)


def test_causal_bias_leaves_tuned_offsets_alone():
    key = table_key(model_key(LLAMA_70B), 4, "H100")
    SplitTable(key, {4096: {"split_offset": 64, "no_split": False}}, min_tokens=1024).save()
    assert split_point_for(4096, LLAMA_70B, 4, gpu_name="H100", num_sms=132,
                           seq_lens=[4096]) == 2048 + 64


def test_a_bad_mode_leaves_the_policy_as_it_was():
    from types import SimpleNamespace

    import torch

    from weavelm.weave.policy import SchedulePolicy
    from weavelm.errors import WeavelmError
    policy = SchedulePolicy("auto", LLAMA_70B, SimpleNamespace(device=torch.device("cpu"),
                                                               world_size=1))
    with pytest.raises(WeavelmError, match="unknown mode 'bogus'"):
        policy.set_mode("bogus")
    assert policy.auto and policy.decode().value == "baseline"
