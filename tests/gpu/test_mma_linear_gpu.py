"""The few-token tensor-core kernel's 16-bit form (`kernels/mma_linear.py`, `mma_cuda`) on a
GPU: against the float32 product at Llama-3-8B's shapes and odd ones, every split of K; the
same bits on a second call (the split-K counters back at 0) and inside a CUDA graph; a token's
row the same whatever its batch-mates; and a linear layer taking it where
`layers.MMA_MAX_TOKENS` and `MMA_MAX_ROWS` say, cuBLAS elsewhere."""
import pytest
import torch

pytestmark = pytest.mark.gpu

SHAPES = ((6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096), (8 * 37, 32 * 5))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_16bit_mma_equals_the_product():
    from weavelm.kernels import mma_linear as M
    g = torch.Generator(device="cuda").manual_seed(5)
    for n, k in SHAPES:
        for dtype in (torch.bfloat16, torch.float16) if n == 4096 else (torch.bfloat16,):
            w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(dtype)
            for tokens in (1, 5, 16, 17, 33, 64):
                x = torch.randn(tokens, k, device="cuda", generator=g).to(dtype)
                assert M.supported_16(x, w)
                want = x.float() @ w.float().t()
                for splits in (None, 1, 3):
                    got = M.mma_cuda(x, w, splits=splits)
                    assert got.dtype == dtype and got.shape == (tokens, n)
                    # one rounding of fp32 sums: 2^-9 (bf16) relative at most, ~2e-3 rms
                    assert rel(got, want) < 3e-3, (n, k, dtype, tokens, splits)
                    assert torch.equal(M.mma_cuda(x, w, splits=splits), got)
                assert rel(got, torch.nn.functional.linear(x, w)) < 5e-3


def test_16bit_mma_token_rows_do_not_depend_on_their_batch_mates():
    from weavelm.kernels import mma_linear as M
    g = torch.Generator(device="cuda").manual_seed(6)
    w = (torch.randn(4096, 14336, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(64, 14336, device="cuda", generator=g).bfloat16()
    full = M.mma_cuda(x, w)
    for tokens in (5, 16, 40):
        assert torch.equal(M.mma_cuda(x[:tokens].contiguous(), w), full[:tokens]), tokens


def test_linear_layer_takes_the_kernel_where_asked_and_replays_in_a_graph(monkeypatch):
    from weavelm.kernels import mma_linear as M
    from weavelm.parallel import layers
    g = torch.Generator(device="cuda").manual_seed(7)
    o = layers.RowParallelLinear(4096, 4096, params_dtype=torch.bfloat16, device="cuda")
    gate_up = layers.MergedColumnParallelLinear(4096, [14336] * 2, params_dtype=torch.bfloat16,
                                                device="cuda")
    for layer in (o, gate_up):
        layer.weight.data.normal_(0.0, 0.02, generator=g)
    x = torch.randn(64, 4096, device="cuda", generator=g).bfloat16()
    monkeypatch.setattr(layers, "MMA_MAX_TOKENS", 0)            # off: cuBLAS
    assert torch.equal(o(x), torch.nn.functional.linear(x, o.weight))
    monkeypatch.setattr(layers, "MMA_MAX_TOKENS", 64)
    monkeypatch.setattr(layers, "MMA_MAX_ROWS", 8192)
    assert torch.equal(o(x), M.mma_cuda(x, o.weight))
    assert torch.equal(o(x[:16]), M.mma_cuda(x[:16].contiguous(), o.weight))
    assert torch.equal(gate_up(x), torch.nn.functional.linear(x, gate_up.weight))  # 28,672 rows
    big = torch.randn(65, 4096, device="cuda", generator=g).bfloat16()              # 65 tokens
    assert torch.equal(o(big), torch.nn.functional.linear(big, o.weight))
    monkeypatch.setattr(layers, "MMA_MIN_TOKENS", 17)
    assert torch.equal(o(x[:16]), torch.nn.functional.linear(x[:16], o.weight))
    assert torch.equal(o(x[:17]), M.mma_cuda(x[:17].contiguous(), o.weight))
    monkeypatch.setattr(layers, "MMA_MIN_TOKENS", 1)
    # in a CUDA graph: the workspace and counters of the capture stream, back at 0 each replay
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        o(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = o(static)
    for seed in (8, 9, 10):
        static.copy_(torch.randn(64, 4096, device="cuda",
                                 generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(y, M.mma_cuda(static, o.weight)), seed
