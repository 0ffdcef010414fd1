"""Mixture of experts on one GPU in bf16: the grouped-GEMM path (torch._grouped_mm on sm90+)
equals the loop-of-mm path and a float64 reference; the decode GEMV kernels (1..8 tokens)
equal the grouped path and the reference at real shapes (mixtral-8x7b whole and at TP 8,
qwen3-30b-a3b) and under CUDA-graph capture; the whole block is captured in a CUDA graph
(no host sync) and replays other routings correctly; CUDA-graph decode of a tiny Mixtral gives
eager decode's tokens; tiny Mixtral and Qwen3-MoE logits match transformers within its own
bf16 error."""
import pytest
import torch

from tiny_models import make_tiny, reference_logits

pytestmark = pytest.mark.gpu
SEQS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42, 43, 44, 45, 46, 47, 99],
        [2, 3, 4], [17]]


def _weights(E, D, inter, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, D, device="cuda", generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, inter, device="cuda", generator=g) / inter ** 0.5).to(dtype)
    return w13, w2


def _inputs(T, E, K, D, seed, dtype=torch.bfloat16):
    from weavelm.kernels.moe import route
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    weights, ids = route(torch.randn(T, E, device="cuda", generator=g), K, True)
    return x, weights, ids


def _needs_native():
    from weavelm.kernels.moe import grouped_mm_native_ok
    a = torch.empty(8, 64, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_native_ok(a, a.new_empty(2, 64, 64)):
        pytest.skip("torch._grouped_mm needs bf16 on sm90+ with this torch")


@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (5, 8, 2), (300, 8, 2), (77, 64, 8)])
def test_grouped_gemm_equals_loop_and_reference(T, E, K):
    from weavelm.kernels.moe import moe_experts, moe_experts_reference
    _needs_native()
    D, inter = 256, 352                 # 352: an expert slice not a multiple of 128
    w13, w2 = _weights(E, D, inter, seed=T)
    x, weights, ids = _inputs(T, E, K, D, seed=T + 1)
    native = moe_experts(x, w13, w2, weights, ids, impl="native").float()
    loop = moe_experts(x, w13, w2, weights, ids, impl="loop").float()
    ref = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    scale = ref.abs().max().item()
    assert (native - loop).abs().max().item() <= 2e-2 * scale
    assert (native.double() - ref).abs().max().item() <= 3e-2 * scale


@pytest.mark.parametrize("dtype,T,impl", [(torch.bfloat16, 4, "grouped"),
                                          (torch.float32, 16, "auto")])
def test_moe_block_is_captured_in_a_cuda_graph(dtype, T, impl):
    # bf16: torch's grouped GEMM; fp32 at 16 tokens: neither it nor the gemv kernels take it,
    # so the loop of mm runs, masked (no host read of the offsets) while capturing
    from weavelm.kernels.moe import moe_experts, moe_experts_reference, route
    if dtype == torch.bfloat16:
        _needs_native()
    E, K, D, inter = 8, 2, 256, 128
    w13, w2 = (w.to(dtype) for w in _weights(E, D, inter, seed=0))
    x, weights, ids = _inputs(T, E, K, D, seed=1)
    x = x.to(dtype)
    logits = torch.randn(T, E, device="cuda")
    out = torch.empty(T, D, device="cuda", dtype=dtype)

    def block():
        w, i = route(logits, K, True)
        moe_experts(x, w13, w2, w, i, out=out, impl=impl)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block()                                      # warm-up (cuBLAS handles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):     # raises on any host sync
        block()
    for seed in (2, 3, 4):                           # new tokens and new routings, replayed
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(T, D, device="cuda", generator=g))
        logits.copy_(torch.randn(T, E, device="cuda", generator=g) * 3)
        graph.replay()
        torch.cuda.synchronize()
        w, i = route(logits, K, True)
        ref = moe_experts_reference(x.double(), w13.double(), w2.double(), w.double(), i)
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
        assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_graph_decode_of_tiny_mixtral_equals_eager(tmp_path):
    from weavelm import LLM, SamplingParams
    # head dim 32: the smallest the paged decode kernel (and so graph decode) takes in bf16
    make_tiny("mixtral", tmp_path / "mixtral", seed=4, kv_heads=1, heads=2)
    prompts = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8], [30 + i for i in range(37)]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path / "mixtral"), tp=1, device="cuda", dtype="bfloat16",
                  progress=False, enforce_eager=eager, max_num_seqs=8)
        assert bool(llm.runner.graphs) is not eager
        tokens[eager] = [o.token_ids for o in llm.generate_from_ids(prompts, params)]
        del llm
    assert tokens[False] == tokens[True]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_bf16_moe_logits_match_transformers(kind, tmp_path):
    from weavelm import LLM
    model = make_tiny(kind, tmp_path / kind)
    ref = reference_logits(model, SEQS)                              # fp32, CPU
    m = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        hf = torch.cat([m(torch.tensor([s], device="cuda")).logits[0] for s in SEQS])
    llm = LLM(str(tmp_path / kind), tp=1, device="cuda", dtype="bfloat16", progress=False)
    ours = llm.logits(SEQS).float().cpu()
    err_ours = (ours - ref).abs().max().item()
    err_hf = (hf.float().cpu() - ref).abs().max().item()
    assert torch.isfinite(ours).all()
    assert err_ours <= 3 * err_hf + 1e-2, (err_ours, err_hf)


# (T, E, K, D, I): mixtral-8x7b whole and at TP 8, qwen3-30b-a3b at TP 1 and 8 (I / 8 = 12
# vectors: 8 lanes a row), 8 tokens on few experts
GEMV_SHAPES = [(1, 8, 2, 4096, 14336), (1, 8, 2, 4096, 1792), (3, 128, 8, 2048, 768),
               (8, 128, 8, 2048, 96), (8, 4, 2, 1024, 352)]


@pytest.mark.parametrize("T,E,K,D,inter", GEMV_SHAPES)
def test_gemv_equals_grouped_and_reference(T, E, K, D, inter):
    from weavelm.kernels import moe_gemv
    from weavelm.kernels.moe import moe_experts, moe_experts_reference
    w13, w2 = _weights(E, D, inter, seed=T + inter)
    x, weights, ids = _inputs(T, E, K, D, seed=T + 1)
    assert moe_gemv.unsupported(x, w13, w2, weights, ids) is None
    gemv = moe_experts(x, w13, w2, weights, ids, impl="gemv").float()
    auto = moe_experts(x, w13, w2, weights, ids).float()
    grouped = moe_experts(x, w13, w2, weights, ids, impl="grouped").float()
    ref = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    scale = ref.abs().max().item()
    assert torch.equal(gemv, auto)                   # auto takes the gemv path here
    assert (gemv - grouped).abs().max().item() <= 2e-2 * scale
    assert (gemv.double() - ref).abs().max().item() <= 1e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_other_dtypes(dtype):
    from weavelm.kernels.moe import moe_experts, moe_experts_reference
    T, E, K, D, inter = 4, 6, 2, 512, 256
    w13, w2 = _weights(E, D, inter, seed=3, dtype=dtype)
    x, weights, ids = _inputs(T, E, K, D, seed=4, dtype=dtype)
    got = moe_experts(x, w13, w2, weights, ids, impl="gemv").double()
    ref = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("T", [1, 6])
def test_gemv_block_is_captured_in_a_cuda_graph(T):
    """route + the gemv kernels in one graph: ids are read on the device, so new routings
    replay correctly (experts shared or not)."""
    from weavelm.kernels import moe_gemv
    from weavelm.kernels.moe import moe_experts, moe_experts_reference, route
    E, K, D, inter = 8, 2, 1024, 512
    w13, w2 = _weights(E, D, inter, seed=5)
    x, weights, ids = _inputs(T, E, K, D, seed=6)
    assert moe_gemv.unsupported(x, w13, w2, weights, ids) is None
    logits = torch.randn(T, E, device="cuda")
    out = torch.empty(T, D, device="cuda", dtype=torch.bfloat16)

    def block():
        w, i = route(logits, K, True)
        moe_experts(x, w13, w2, w, i, out=out, impl="gemv")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block()                                      # warm-up: compiles, sizes the grid
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        block()
    for seed in (7, 8, 9):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(T, D, device="cuda", generator=g))
        logits.copy_(torch.randn(T, E, device="cuda", generator=g) * 3)
        if seed == 9:
            logits[:, :2] += 100                     # every token on experts 0 and 1
        graph.replay()
        torch.cuda.synchronize()
        w, i = route(logits, K, True)
        ref = moe_experts_reference(x.double(), w13.double(), w2.double(), w.double(), i)
        assert (out.double() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
