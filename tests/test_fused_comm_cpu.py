"""The fused communicators on CPU: multicast guard, backend choice, and the Python path up to the
kernel launch (kernels mocked; they are tested in tests/kernels and on GPUs).

No CUDA is touched: CUDA queries are monkeypatched, torch's symmetric-memory module is a fake that
records what it was asked, and symmetric buffers are CPU tensors.
T = tokens, D = hidden size, N = ranks.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from weavelm.errors import WeavelmError
from weavelm.kernels import allreduce_norm as K
from weavelm.kernels import launcher
from weavelm.kernels.allreduce_norm_layout import ERR_OFF, SIG_BYTES
from weavelm.parallel import backends, fused_communicator as FC, multicast_guard, symmetric
from weavelm.parallel.communicator import row_range
from weavelm.parallel.state import ParallelState

GUARD_VARS = [("WEAVELM_DISABLE_MULTICAST", "1"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
              ("NCCL_NVLS_ENABLE", "0")]
ALL_VARS = [k for k, _ in GUARD_VARS] + ["NVSHMEM_DISABLE_NVLS"]


def cuda_state(rank=0, world=2) -> ParallelState:
    return ParallelState(rank=rank, world_size=world, device=torch.device("cuda", rank),
                         group=None)


@pytest.fixture
def clean_env(monkeypatch):
    """No guard variable set (monkeypatch restores the real environment afterwards)."""
    for k in ALL_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.fixture
def fake_gpus(clean_env):
    """A host with 4 Hopper GPUs with peer access and multicast support, as far as weavelm asks."""
    mp = clean_env
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: 4)
    mp.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    mp.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mp.setattr(multicast_guard, "_device_supports_multicast", lambda i: True)
    return mp


class FakeHandle:
    """What rendezvous returns; reading multicast_ptr is recorded."""

    def __init__(self, t, rank, world, log):
        self.rank, self.world_size, self._log = rank, world, log
        self.buffer_ptrs = [t.data_ptr() + (p - rank) * (1 << 40) for p in range(world)]
        self.buffer_size = t.numel()
        self.signal_pad_ptrs = [0x1000 * (p + 1) for p in range(world)]

    @property
    def multicast_ptr(self):
        self._log.append("multicast_ptr")
        return 0xABC000


class FakeSymm:
    """Stands in for torch.distributed._symmetric_memory; records calls and the environment."""

    def __init__(self, rank=0, world=2):
        self.rank, self.world, self.log = rank, world, []

    def _env(self):
        return os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")

    def empty(self, *size, dtype=None, device=None):
        self.log.append(("empty", self._env()))
        return torch.zeros(*size, dtype=dtype)

    def rendezvous(self, t, group):
        self.log.append(("rendezvous", self._env(), group))
        return FakeHandle(t, self.rank, self.world, self.log)


# ----------------------------------------------------------------------------- the guard

@pytest.mark.parametrize("var,value", GUARD_VARS)
def test_each_guard_variable_refuses_multimem(fake_gpus, var, value):
    fake_gpus.setenv(var, value)
    touched = []
    fake_gpus.setattr(multicast_guard, "_device_supports_multicast",
                      lambda i: touched.append("attr") or True)
    fake_gpus.setattr(symmetric, "allocate", lambda *a, **k: touched.append("allocate"))
    fake_gpus.setattr(symmetric, "_symm_module", lambda: touched.append("symm"))
    with pytest.raises(WeavelmError, match="multimem communicator is refused: " + var):
        FC.MultimemCommunicator(cuda_state())
    with pytest.raises(WeavelmError, match="refused"):
        backends.make_communicator("multimem", cuda_state())
    assert touched == []  # refused before the device, torch's symmetric memory or any buffer


@pytest.mark.parametrize("var,value", GUARD_VARS)
def test_each_guard_variable_makes_auto_pick_p2p(fake_gpus, var, value):
    fake_gpus.setenv(var, value)
    assert backends.select_backend(cuda_state()) == "p2p"
    fake_gpus.setattr(torch.cuda, "can_device_access_peer", lambda a, b: (a, b) != (1, 0))
    assert backends.select_backend(cuda_state()) == "torch"


def test_auto_choices(fake_gpus, caplog):
    caplog.set_level("INFO", logger="weavelm")
    assert backends.select_backend(cuda_state()) == "multimem"  # allowed and supported
    assert "auto -> multimem" in caplog.text
    fake_gpus.setattr(multicast_guard, "_device_supports_multicast", lambda i: False)
    assert backends.select_backend(cuda_state()) == "p2p"
    assert backends.select_backend(cuda_state(world=1)) == "torch"
    cpu = ParallelState(rank=0, world_size=2, device=torch.device("cpu"), group=None)
    assert backends.select_backend(cpu) == "torch"
    fake_gpus.setattr(torch.cuda, "device_count", lambda: 1)
    assert backends.select_backend(cuda_state()) == "torch"  # TP group bigger than this host


def test_auto_on_cpu_gives_torch_backend(clean_env):
    cpu = ParallelState(rank=0, world_size=2, device=torch.device("cpu"), group=None)
    assert backends.make_communicator("auto", cpu).name == "torch"
    assert backends.make_communicator(None, cpu).name == "torch"
    with pytest.raises(WeavelmError, match="unknown communicator backend 'nccl'"):
        backends.make_communicator("nccl", cpu)


def test_fused_backends_refuse_cpu():
    cpu = ParallelState(rank=0, world_size=2, device=torch.device("cpu"), group=None)
    for cls in (FC.P2PCommunicator, FC.MultimemCommunicator):
        with pytest.raises(WeavelmError, match="needs CUDA"):
            cls(cpu)
    with pytest.raises(WeavelmError, match="need CUDA"):
        symmetric.allocate(1024, torch.device("cpu"))


@pytest.mark.parametrize("var,value", GUARD_VARS + [(None, None)])
def test_symmetric_allocate_never_touches_multicast(fake_gpus, var, value):
    """p2p buffers: TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is set before torch allocates or
    rendezvouses (whatever the reason), and multicast_ptr is never read."""
    if var:
        fake_gpus.setenv(var, value)
    fake = FakeSymm(rank=1, world=2)
    fake_gpus.setattr(symmetric, "_symm_module", lambda: fake)
    buf = symmetric.allocate(1000, torch.device("cuda", 1), "tp", world_size=2, rank=1)
    assert fake.log == [("empty", "1"), ("rendezvous", "1", "tp")]
    assert "multicast_ptr" not in fake.log and buf.multicast_ptr == 0
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    assert buf.data_bytes == 1024 and buf.sig_off == 1024  # rounded to 256, signal area after
    assert buf.tensor.numel() == 1024 + SIG_BYTES
    assert buf.buffer_ptrs[1] == buf.base and buf.buffer_ptrs[0] == buf.base - (1 << 40)
    assert buf.ptr_table.tolist() == buf.buffer_ptrs
    p = buf.peers()
    assert (p.my_base, p.mc, p.rank, p.world, p.sig_off) == (buf.base, 0, 1, 2, 1024)


@pytest.mark.parametrize("var,value", GUARD_VARS)
def test_symmetric_allocate_refuses_multicast_when_forbidden(fake_gpus, var, value):
    fake_gpus.setenv(var, value)
    fake = FakeSymm()
    fake_gpus.setattr(symmetric, "_symm_module", lambda: fake)
    with pytest.raises(WeavelmError, match="not allowed"):
        symmetric.allocate(1000, torch.device("cuda", 0), "tp", world_size=2, multicast=True)
    assert fake.log == []


def test_symmetric_allocate_multicast_when_allowed_reads_it(fake_gpus):
    """The only path that reads multicast_ptr: asked for, and allowed."""
    fake = FakeSymm()
    fake_gpus.setattr(symmetric, "_symm_module", lambda: fake)
    buf = symmetric.allocate(1000, torch.device("cuda", 0), "tp", world_size=2, multicast=True)
    assert fake.log[0] == ("empty", None) and "multicast_ptr" in fake.log
    assert buf.multicast_ptr == 0xABC000


# ----------------------------------------------------------------------------- to the launch

class Launches:
    def __init__(self):
        self.calls = []


@pytest.fixture
def mocked_launch(fake_gpus):
    """Kernel.compile is a no-op and Kernel.launch records (kernel name, grid, block, args)."""
    rec = Launches()
    fake_gpus.setattr(launcher.Kernel, "compile", lambda self, device=0: None)
    fake_gpus.setattr(launcher.Kernel, "launch",
                      lambda self, grid, block, dev, *args: rec.calls.append(
                          (self.name, grid, block, dev, args)))

    def fake_allocate(data_bytes, device, group=None, world_size=1, rank=0, *, multicast=False):
        assert not multicast
        t = torch.zeros(data_bytes + SIG_BYTES, dtype=torch.uint8)
        ptrs = [t.data_ptr() + (p - rank) * (1 << 40) for p in range(world_size)]
        return symmetric.SymmetricBuffer(t, data_bytes, ptrs, [], 0, rank, world_size)
    fake_gpus.setattr(symmetric, "allocate", fake_allocate)
    return rec


def cpu_comm(rank, world, **kw):
    """A P2PCommunicator whose tensors live on the CPU: the Python path only."""
    comm = FC.P2PCommunicator(cuda_state(rank, world), **kw)
    comm.state = dataclasses.replace(comm.state, device=torch.device("cpu"))
    return comm


FUSED_ARGS = ("tab", "my_base", "mc", "rank", "x_off", "sig_off", "res_ptr", "w_ptr", "out_ptr",
              "row_start", "n_rows", "n_vec", "eps", "timeout_ns", "err_host", "inbox_off",
              "n_total")
AR_ARGS = ("tab", "my_base", "mc", "rank", "x_off", "sig_off", "out_ptr", "v_start", "n_vecs",
           "timeout_ns", "err_host")


@pytest.mark.parametrize("scatter", [True, False])
@pytest.mark.parametrize("T,N", [(7, 3), (1, 4), (4096, 4), (5, 2)])
def test_sharded_fused_launch_args(mocked_launch, T, N, scatter):
    D, dtype = 64, torch.bfloat16
    grids = set()
    for rank in range(N):
        comm = cpu_comm(rank, N, ctas=8)
        comm.scatter = scatter
        x = comm.staging(T, D, dtype)  # zero-copy input
        x.copy_(torch.randn(T, D).to(dtype))
        s, e = row_range(T, rank, N)
        res, w = torch.randn(e - s, D).to(dtype), torch.randn(D).to(dtype)
        y = comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, 1e-5)
        assert y.data_ptr() == x.data_ptr() and y.shape == (T, D)  # the output is the buffer
        name, grid, block, dev, args = mocked_launch.calls[-1]
        a = dict(zip(FUSED_ARGS, args))
        buf = comm.buf
        assert name.startswith("ar_norm/p2p/bf16/") and f"/{N}/" in name
        assert a["tab"] == buf.ptr_table.data_ptr() and a["my_base"] == buf.base
        assert a["mc"] == 0 and a["rank"] == rank and a["x_off"] == 0
        assert a["sig_off"] == buf.sig_off and a["w_ptr"] == w.data_ptr()
        assert (a["row_start"], a["n_rows"]) == (s, e - s) and a["n_vec"] == D * 2 // 16
        assert a["res_ptr"] == (res.data_ptr() if e > s else w.data_ptr())  # valid if unused
        assert a["timeout_ns"] == int(FC.FIRST_LAUNCH_TIMEOUT_S * 1e9)  # first launch
        assert a["err_host"] == buf.err_host.data_ptr()
        assert grid == min(8, -(-T // N)) and block == 32 and dev == 0
        assert name.endswith(f"/{scatter}")
        if scatter:   # slot 0's inbox follows it and holds N x ceil(T / N) rows
            assert a["inbox_off"] == comm.slot_bytes and a["n_total"] == T
            assert comm.slot_bytes >= N * -(-T // N) * D * 2
            assert buf.data_bytes >= 2 * comm.slot_bytes
        else:
            assert a["inbox_off"] == 0
        grids.add(grid)
        comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, 1e-5, ctas=2)
        name2, grid2, *_, args2 = mocked_launch.calls[-1]
        assert grid2 == min(2, -(-T // N)) and name2 == name
        assert args2[13] == int(comm.timeout_s * 1e9)  # warm: the normal timeout
    assert len(grids) == 1  # every rank launches the same grid


def test_copy_in_when_input_is_not_the_staging_buffer(mocked_launch):
    comm = cpu_comm(0, 2)
    x = torch.randn(3, 16).to(torch.bfloat16)
    res, w = torch.randn(2, 16).to(torch.bfloat16), torch.randn(16).to(torch.bfloat16)
    comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, 1e-6)
    assert torch.equal(comm.buf.view(3, 16, torch.bfloat16), x)  # copied in at offset 0
    assert dict(zip(FUSED_ARGS, mocked_launch.calls[-1][4]))["x_off"] == 0
    with pytest.raises(WeavelmError, match="residual_rows must be"):
        comm.reduce_scatter_add_rms_norm_all_gather(x, torch.zeros(3, 16, dtype=torch.bfloat16),
                                                    w, 1e-6)


def test_all_reduce_one_and_two_shot(mocked_launch):
    comm = cpu_comm(2, 4, ctas=4)
    x = torch.randn(5, 64).to(torch.bfloat16)  # 640 bytes: one-shot
    out = comm.all_reduce(x)
    a = dict(zip(AR_ARGS, mocked_launch.calls[-1][4]))
    assert out is x and (a["v_start"], a["n_vecs"], a["out_ptr"]) == (0, 40, x.data_ptr())
    comm.oneshot_max_bytes = 0
    xs = comm.staging(5, 64, torch.bfloat16)
    assert comm.all_reduce(xs) is xs  # two-shot: in place in the buffer
    name, grid, block, _, args = mocked_launch.calls[-1]
    a = dict(zip(AR_ARGS, args))
    s, e = row_range(40, 2, 4)
    assert name.endswith("/True") and (a["v_start"], a["n_vecs"]) == (s, e - s)
    assert grid == 1 and block == 32  # 10 vectors per rank


def test_unsupported_shapes_fall_back_to_torch(mocked_launch, monkeypatch):
    comm = cpu_comm(0, 2)
    called = []
    monkeypatch.setattr(comm._torch, "all_reduce", lambda x: called.append(x.shape) or x)
    comm.all_reduce(torch.randn(3, 7))  # 28-byte rows: not 16-byte vectors
    assert called == [(3, 7)] and mocked_launch.calls == []


def test_timeout_error_names_the_missing_rank(mocked_launch):
    comm = cpu_comm(0, 4)
    comm.staging(4, 16, torch.bfloat16)
    code = 0x80000000 | (1 << 16) | (5 << 8) | 3  # start barrier, CTA 5, waited for rank 3
    comm.buf.signal_area()[ERR_OFF // 4] = code - (1 << 32)
    with pytest.raises(WeavelmError, match=r"rank 0 timed out .* start barrier \(CTA 5\) "
                                           r"waiting for rank 3, which never arrived"):
        comm.check_errors()
    comm.buf.err_host[0] = code - (1 << 32)
    with pytest.raises(WeavelmError, match="waiting for rank 3"):
        comm.all_reduce(torch.randn(2, 16).to(torch.bfloat16))  # checked before launching
    comm.reset()
    comm.check_errors()  # cleared


def test_buffer_grows_but_not_during_capture(mocked_launch, monkeypatch):
    comm = cpu_comm(0, 2)
    comm.scatter = False  # plain staging only (with scatter every slot is followed by an inbox)
    small = comm.staging(4, 16, torch.bfloat16)
    assert comm.buf.data_bytes == 1 << 20
    big = comm.staging(1024, 1024, torch.bfloat16)  # 2 MiB
    assert comm.buf.data_bytes == 2 << 20 and big.shape == (1024, 1024) and small.numel() == 64
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(WeavelmError, match="reserve"):
        comm.staging(4096, 1024, torch.bfloat16)


def test_first_use_of_a_kernel_during_capture_is_refused(mocked_launch, monkeypatch):
    comm = cpu_comm(0, 2)
    x = comm.staging(2, 16, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(WeavelmError, match="before capturing"):
        comm.all_reduce(x)


# ----------------------------------------------------------------------------- row split

@pytest.mark.parametrize("N", range(1, 9))
def test_row_split_covers_balanced_and_grid_is_rank_independent(N):
    for T in range(0, 70):
        ranges = [row_range(T, r, N) for r in range(N)]
        assert ranges[0][0] == 0 and ranges[-1][1] == T
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(N - 1))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) == -(-T // N)
        if T:
            grids = {K.plan_fused("p2p", "bf16", N, 8, -(-T // N), 16, True, True)[1]
                     for _ in ranges}
            assert grids == {min(16, -(-T // N))}


def test_scatter_layout_two_slots(mocked_launch):
    """The weave's two halves: each staging slot is followed by its own inbox, none overlap,
    and a half's staging view stays where it was (zero copy) through the fused op."""
    N, D, dtype = 4, 64, torch.bfloat16
    comm = cpu_comm(1, N)
    assert not comm.scatter       # the pull kernel is the default (WEAVELM_P2P_SCATTER=1: scatter)
    comm.scatter = True
    comm.reserve_slots(10, D, dtype, slots=2)
    xs = [comm.staging(10 - slot, D, dtype, slot=slot) for slot in (0, 1)]
    offs = []
    for slot, x in enumerate(xs):
        T = x.shape[0]
        s, e = row_range(T, 1, N)
        res, w = torch.zeros(e - s, D, dtype=dtype), torch.ones(D, dtype=dtype)
        y = comm.reduce_scatter_add_rms_norm_all_gather(x, res, w, 1e-6, slot=slot)
        a = dict(zip(FUSED_ARGS, mocked_launch.calls[-1][4]))
        assert y.data_ptr() == x.data_ptr() and a["n_total"] == T
        offs.append((a["x_off"], a["inbox_off"]))
    sb = comm.slot_bytes
    assert offs == [(0, sb), (2 * sb, 3 * sb)] and sb >= N * 3 * D * 2
    assert comm.buf.data_bytes >= 4 * sb
