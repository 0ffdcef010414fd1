"""The multimem communicator's first-use self-check, on CPU: the host path around the kernels.

Kernels are fakes that act on the symmetric buffer by address (the real kernels and the check's
steps over simulated ranks: tests/kernels/test_allreduce_norm_multimem_sim.py). The fake p2p
fused kernel writes y = 2 x and adds 1 to the residual rows; the fake multimem one does the same
or, "broken", y = 3 x. No CUDA, no multicast object: buffers are CPU tensors, devices are faked.
T = tokens, D = hidden size, N = ranks.
"""
from __future__ import annotations

import ctypes

import pytest
import torch
from test_fused_comm_cpu import ALL_VARS, FUSED_ARGS, cuda_state

from weavelm.kernels import launcher
from weavelm.kernels.allreduce_norm_layout import SIG_BYTES
from weavelm.parallel import backends, fused_communicator as FC, multicast_guard, symmetric
from weavelm.parallel import transport_check


def _at(ptr: int, n: int, dtype) -> torch.Tensor:
    """n elements of `dtype` at host address ptr (a view)."""
    raw = (ctypes.c_char * (n * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype)


@pytest.fixture
def fake_kernels(monkeypatch):
    """A host of 2 Hopper GPUs allowed to use multicast, as far as weavelm asks; Kernel.launch runs a fake of the fused kernel (see module doc); returns the launch log
    [(transport, input rows seen)] and a switch breaking the multimem one."""
    mp = monkeypatch
    for k in ALL_VARS:
        mp.delenv(k, raising=False)
    for name, fn in [("is_available", lambda: True), ("device_count", lambda: 2),
                     ("can_device_access_peer", lambda a, b: True),
                     ("get_device_capability", lambda i=None: (9, 0)),
                     ("synchronize", lambda *a, **k: None),
                     ("is_current_stream_capturing", lambda: False)]:
        mp.setattr(torch.cuda, name, fn)
    mp.setattr(multicast_guard, "_device_supports_multicast", lambda i: True)
    log, state = [], {"broken": False}

    def launch(self, grid, block, dev, *args):
        kind, dt = self.name.split("/")[1:3]
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dt]
        a = dict(zip(FUSED_ARGS, args))
        D = a["n_vec"] * 16 // dtype.itemsize
        x = _at(a["my_base"] + a["x_off"], a["n_total"] * D, dtype)
        log.append((kind, x.clone()))
        x.mul_(3 if kind == "multimem" and state["broken"] else 2)
        if a["n_rows"]:
            _at(a["res_ptr"], a["n_rows"] * D, dtype).add_(1)

    def allocate(data_bytes, device, group=None, world_size=1, rank=0, *, multicast=False):
        t = torch.zeros(data_bytes + SIG_BYTES, dtype=torch.uint8)
        return symmetric.SymmetricBuffer(t, data_bytes, [t.data_ptr()] * world_size, [],
                                         0xABC000 if multicast else 0, rank, world_size)
    mp.setattr(launcher.Kernel, "compile", lambda self, device=0: None)
    mp.setattr(launcher.Kernel, "launch", launch)
    mp.setattr(symmetric, "allocate", allocate)
    transport_check.reset()
    yield log, state
    transport_check.reset()


def _comm():
    comm = FC.MultimemCommunicator(cuda_state(0, 2))
    comm.state = comm.state.__class__(rank=0, world_size=2, device=torch.device("cpu"),
                                      group=None)
    return comm


def _call(comm, T=5, D=16):
    x = comm.staging(T, D, torch.bfloat16)
    x.copy_(torch.arange(T * D, dtype=torch.float32).view(T, D).to(torch.bfloat16) / 8)
    x0 = x.clone()
    res = torch.zeros(3, D, dtype=torch.bfloat16)        # rank 0 of 2 owns rows 0..2 of 5
    y = comm.reduce_scatter_add_rms_norm_all_gather(x, res, torch.ones(D, dtype=torch.bfloat16),
                                                    1e-6)
    return x0, y, res


def test_healthy_multimem_passes_its_first_use_check(fake_kernels, caplog):
    log, _ = fake_kernels
    comm = _comm()
    x0, y, res = _call(comm)
    assert [k for k, _ in log] == ["multimem", "p2p"]     # first call: both, multimem first
    assert torch.equal(log[1][1], x0.flatten())                   # p2p ran on the restored input
    assert torch.equal(y, 2 * x0) and res.eq(1).all()     # residual restored, then updated once
    assert comm.transport == "multimem" and transport_check.fallback() is None
    _call(comm)
    assert [k for k, _ in log[2:]] == ["multimem"]        # checked once per kernel
    assert "self-check failed" not in caplog.text


def test_broken_multimem_falls_back_to_p2p_for_the_process(fake_kernels, caplog):
    log, state = fake_kernels
    state["broken"] = True
    caplog.set_level("WARNING", logger="weavelm")
    comm = _comm()
    x0, y, res = _call(comm)
    assert torch.equal(y, 2 * x0) and res.eq(1).all()     # the p2p result is returned
    lines = [r.getMessage() for r in caplog.records if "self-check failed" in r.getMessage()]
    assert len(lines) == 1 and "fused op: output 0 differs from p2p" in lines[0]
    assert "using the p2p transport for the rest of this process" in lines[0]
    assert comm.transport == "p2p" and transport_check.fallback() == lines[0]
    _call(comm)
    assert [k for k, _ in log[2:]] == ["p2p"]
    # the process keeps p2p: auto and an explicit multimem both give p2p now
    assert backends.select_backend(cuda_state(0, 2)) == "p2p"
    assert backends.fused_choice(0, 2) == ("p2p", lines[0])
    assert isinstance(backends.make_communicator("multimem", cuda_state(0, 2)),
                      FC.P2PCommunicator)


def test_first_use_check_is_not_captured(fake_kernels, monkeypatch):
    comm = _comm()
    comm.staging(5, 16, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(Exception, match="before capturing"):
        _call(comm)


def test_mismatch_tolerance():
    """Within a few ulps of the dtype (the switch's extra rounding) passes; a partial sum's
    worth of difference does not."""
    want = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    one_ulp = want.float() * (1 + 2.0 ** -8)
    assert transport_check.mismatch([one_ulp.to(torch.bfloat16)], [want], 4, "op") is None
    off = want.clone()
    off[3, 5] += 0.25
    msg = transport_check.mismatch([off], [want], 4, "op")
    assert msg.startswith("op: output 0 differs from p2p at (3, 5)")
    nan = torch.full((2,), float("nan"))
    assert transport_check.mismatch([nan], [nan], 2, "op") is None
    assert transport_check.mismatch([torch.zeros(2)], [nan], 2, "op") is not None
