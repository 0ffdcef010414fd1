"""The fused communicator backends, `p2p` and `multimem` (they implement `FusedCollective`).

T = tokens, D = hidden size, N = TP world size, rows(T) = `row_range(T, rank, N)`.

Both run weavelm's own kernels (`kernels/allreduce_norm.py`) on one symmetric buffer per
communicator and differ only in the transport. What they accelerate:

* `reduce_scatter_add_rms_norm_all_gather(x, residual_rows, w, eps)`: the TokenWeave op, one
  launch. Returns the normalised [T, D] *as a view of the staging buffer* (every rank's buffer
  holds all rows): valid until the next collective on this communicator writes the buffer, which
  is exactly what the next layer's GEMM input needs. residual_rows [rows(T), D] updated in place.
* `all_reduce(x)`: one-shot up to `oneshot_max_bytes`, else two-shot (in place in the buffer).
Everything else (reduce_scatter, all_gather, ...) is the torch backend's.

Zero-copy input: write the GEMM output into `comm.staging(T, D, dtype)` (e.g. `torch.matmul(a,
b, out=comm.staging(T, D, a.dtype))`). Any other tensor is copied in first (correct, slower).

The multimem backend checks itself on first use (`transport_check.py`): the first call of each
kernel also runs p2p on the same input and compares; on a mismatch it logs one line and uses
p2p for the rest of the process.

Ranks must call the same collectives with the same shapes in the same order, on one stream (as
with NCCL). A rank that does not arrive makes the others' kernels time out (`timeout_s`); the
next call (or `check_errors()`) raises `WeavelmError` naming the missing rank, and the
communicator stays broken until `reset()` is called on every rank.

CTA count: `ctas` in the constructor (default $WEAVELM_COMM_CTAS or 16), or per call.
"""
from __future__ import annotations

import logging
import os

import torch

from weavelm.errors import WeavelmError
from weavelm.kernels import allreduce_norm as K
from weavelm.kernels.allreduce_norm_layout import BARRIER_NAMES, ERR_OFF, decode_error
from weavelm.parallel import symmetric, transport_check
from weavelm.parallel.communicator import Communicator, TorchCommunicator, row_range
from weavelm.parallel.multicast_guard import multicast_allowed

log = logging.getLogger("weavelm")

# 16: with the pipelined kernel the best standalone time on 4xH100 at 128, 1K, 4K and 16K tokens,
# 32 no faster (benchmarks/HISTORY.md, round 3); the weave asks for fewer per call.
DEFAULT_CTAS = int(os.environ.get("WEAVELM_COMM_CTAS", "16"))
# Ranks drift apart on the host (a tokenizer loading on one rank, the first compile of a
# kernel, a slow print): 5 s proved too short in `weavelm generate` on 4 GPUs. A minute still
# turns a dead rank into a clear error instead of a hang.
DEFAULT_TIMEOUT_S = float(os.environ.get("WEAVELM_COMM_TIMEOUT_S", "60"))
FIRST_LAUNCH_TIMEOUT_S = 120.0  # a kernel's first launch waits for peers still compiling it
DEFAULT_ONESHOT_MAX_BYTES = 512 * 1024
_MIN_BUFFER = 1 << 20
# p2p's fused op pulls the peers' partials with remote loads. WEAVELM_P2P_SCATTER=1 selects the
# stores-only "scatter" kernel instead (peers push their partials into this rank's inbox, then
# every load is local). On 4xH100 it was not faster overall: ahead at 16 CTAs at 4K-8K tokens,
# behind at 8 and 32 CTAs, equal within noise inside the weave (benchmarks/HISTORY.md, round 3).
P2P_SCATTER = os.environ.get("WEAVELM_P2P_SCATTER", "0") == "1"


class FusedCommunicator(Communicator):
    """Shared host logic of the p2p and multimem backends (transport = `self.transport`)."""

    name = "fused"
    transport = "p2p"

    def __init__(self, state, *, ctas: int | None = None, timeout_s: float | None = None,
                 oneshot_max_bytes: int | None = None, reserve_bytes: int = 0):
        super().__init__(state)
        if state.device.type != "cuda":
            raise WeavelmError(f"the {self.name} communicator needs CUDA GPUs; on CPU use the "
                               "'torch' backend")
        self._check_transport()
        self._torch = TorchCommunicator(state)
        self.ctas = ctas or DEFAULT_CTAS
        self.timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self.oneshot_max_bytes = DEFAULT_ONESHOT_MAX_BYTES if oneshot_max_bytes is None \
            else oneshot_max_bytes
        self.device_index = state.device.index if state.device.index is not None else \
            torch.cuda.current_device()
        self.buf: symmetric.SymmetricBuffer | None = None
        self._retired: list = []  # outgrown buffers: views of them may still be alive
        self._warm: set[str] = set()
        self._checked: set[str] = set()  # kernels whose first-use check ran (multimem only)
        self._err = None
        self.slot_bytes = 0       # stride between staging slots (two halves of the weave)
        # with inboxes each staging slot is followed by its inbox: [slot 0 | inbox 0 | slot 1 ...]
        self.scatter = self.transport == "p2p" and P2P_SCATTER
        if reserve_bytes:
            self._ensure(reserve_bytes)

    def _check_transport(self) -> None:
        pass

    # -- buffer ----------------------------------------------------------------------------
    def reserve(self, n_tokens: int, hidden: int, dtype: torch.dtype) -> None:
        """Size the symmetric buffer for [n_tokens, hidden] now (collective; do it before any
        CUDA-graph capture)."""
        self._ensure(n_tokens * hidden * dtype.itemsize)

    def _ensure(self, nbytes: int) -> symmetric.SymmetricBuffer:
        buf = self.buf
        if buf is not None and buf.data_bytes >= nbytes:
            return buf
        if torch.cuda.is_current_stream_capturing():
            raise WeavelmError(f"{self.name} communicator: the symmetric buffer must grow to "
                               f"{nbytes} bytes during CUDA-graph capture; call reserve() first")
        size = max(_MIN_BUFFER, 1 << (int(nbytes) - 1).bit_length())
        if buf is not None:
            torch.cuda.synchronize(self.device_index)
            self._retired.append(buf)
        self.buf = symmetric.allocate(size, self.state.device, self.state.group,
                                      self.world_size, self.rank,
                                      multicast=self.transport == "multimem")
        self._err = self.buf.err_host.numpy()
        torch.cuda.synchronize(self.device_index)  # signal areas zeroed on every rank ...
        self._host_barrier()                        # ... before anyone signals into them
        log.info("weavelm %s communicator: symmetric buffer of %.1f MiB on rank %d", self.name,
                 size / 2**20, self.rank)
        return self.buf

    def reserve_slots(self, n_tokens: int, hidden: int, dtype: torch.dtype, slots: int = 2) -> None:
        """Make room for `slots` independent [n_tokens, hidden] staging regions, so that two
        halves of a batch can be in flight at once (the weave): a collective on slot 1 never
        touches the output view of slot 0. Host-side and cheap once sized."""
        rows = n_tokens
        if self.scatter:   # an inbox holds N slots of ceil(T / N) rows
            rows = max(n_tokens, self.world_size * -(-n_tokens // self.world_size))
        need = -(-rows * hidden * dtype.itemsize // 4096) * 4096
        if need > self.slot_bytes:
            if self.slot_bytes:
                # Moving slot 1 while a view of it may still be read: let the GPU finish first.
                torch.cuda.synchronize(self.device_index)
            self.slot_bytes = 1 << (need - 1).bit_length()
        self._ensure(self._slot_base(slots))

    def _slot_base(self, slot: int) -> int:
        """Byte offset of staging slot `slot` (its inbox, if any, follows it)."""
        return slot * self.slot_bytes * (2 if self.scatter else 1)

    def staging(self, n_tokens: int, hidden: int, dtype: torch.dtype | None = None,
                slot: int = 0):
        """This rank's staging slot `slot` as [n_tokens, hidden]: write partial sums (GEMM
        output) here and pass it to a collective to skip the copy-in."""
        dtype = dtype or torch.get_default_dtype()
        nbytes = n_tokens * hidden * dtype.itemsize
        if self.scatter and self.world_size > 1:
            # lay the slots out now, so the fused op never moves this view to fit its inboxes
            self.reserve_slots(n_tokens, hidden, dtype, slots=slot + 1)
        if slot and self.slot_bytes < nbytes:
            raise WeavelmError(f"{self.name} communicator: staging slot {slot} holds "
                               f"{self.slot_bytes} bytes, {nbytes} needed: call "
                               f"reserve_slots() for the largest half first")
        base = self._slot_base(slot)
        return self._ensure(base + nbytes).view(n_tokens, hidden, dtype, base)

    def _stage(self, x: torch.Tensor, slot: int = 0) -> tuple[int, bool]:
        """(byte offset of x in every rank's buffer, whether x already was there). A tensor
        from elsewhere is copied into staging slot `slot` (see `reserve_slots`)."""
        nbytes = x.numel() * x.element_size()
        if slot:
            if self.slot_bytes < nbytes:
                raise WeavelmError(f"{self.name} communicator: staging slot {slot} holds "
                                   f"{self.slot_bytes} bytes, {nbytes} needed: call "
                                   f"reserve_slots() for the largest half first")
        base = self._slot_base(slot)
        buf = self._ensure(base + nbytes)
        off = buf.offset_of(x)
        if off is not None:
            return off, True
        buf.view(x.numel(), 1, x.dtype, base).view(x.shape).copy_(x)
        return base, False

    # -- errors ----------------------------------------------------------------------------
    def check_errors(self, sync: bool = True) -> None:
        """Raise WeavelmError if a kernel of this communicator timed out. sync=True waits for
        the GPU first; sync=False only reads the host-mapped error word (no sync)."""
        if self.buf is None:
            return
        if sync:
            torch.cuda.synchronize(self.device_index)
            code = int(self.buf.signal_area()[ERR_OFF // 4].item()) & 0xFFFFFFFF
        else:
            code = int(self._err[0]) & 0xFFFFFFFF
        if code:
            peer, barrier, cta = decode_error(code)
            raise WeavelmError(
                f"{self.name} communicator: rank {self.rank} timed out after {self.timeout_s:g} s "
                f"at the {BARRIER_NAMES.get(barrier, barrier)} barrier (CTA {cta}) waiting for "
                f"rank {peer}, which never arrived: rank {peer} did not launch the same "
                f"collective (it crashed, hangs, or called another op or shape). The "
                f"communicator is unusable until reset() is called on every rank")

    def reset(self) -> None:
        """Clear the signal areas and errors after a timeout (collective: every rank)."""
        if self.buf is None:
            return
        torch.cuda.synchronize(self.device_index)
        self.buf.zero_signals()
        torch.cuda.synchronize(self.device_index)
        self._host_barrier()

    def _host_barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier(group=self.state.group)

    # -- launching -------------------------------------------------------------------------
    def _timeout_ns(self, kern) -> int:
        """Compile the kernel on first use (never during capture); its first launch waits long
        enough for peers that are still compiling it."""
        if kern.name in self._warm:
            return int(self.timeout_s * 1e9)
        if torch.cuda.is_current_stream_capturing():
            raise WeavelmError(f"{self.name} communicator: kernel {kern.name} is first used "
                               "during CUDA-graph capture; run the same shapes once before "
                               "capturing")
        kern.compile(self.device_index)
        self._warm.add(kern.name)
        return int(max(self.timeout_s, FIRST_LAUNCH_TIMEOUT_S) * 1e9)

    def _fused(self, dt, *, x_off, n_vec, row_start, n_rows, max_rows, has_residual, res_ptr,
               w_ptr, out_ptr, eps, push, ctas, inbox_off=-1, n_total=0, transport=None):
        transport = transport or self.transport
        kern, _, _ = K.plan_fused(transport, dt, self.world_size, n_vec, max_rows, ctas,
                                  push, has_residual, inbox_off >= 0)
        K.launch_fused(self.buf.peers(), transport, dt, x_off=x_off, n_vec=n_vec,
                       row_start=row_start, n_rows=n_rows, max_rows=max_rows,
                       has_residual=has_residual, res_ptr=res_ptr, w_ptr=w_ptr, out_ptr=out_ptr,
                       eps=eps, push=push, ctas=ctas, timeout_ns=self._timeout_ns(kern),
                       inbox_off=inbox_off, n_total=n_total)

    def _allreduce(self, transport, dt, *, x_off, v_start, n_vecs, max_vecs, out_ptr, push, ctas):
        kern, _, _ = K.plan_allreduce(transport, dt, self.world_size, max_vecs, ctas, push)
        K.launch_allreduce(self.buf.peers(), transport, dt, x_off=x_off, v_start=v_start,
                           n_vecs=n_vecs, max_vecs=max_vecs, out_ptr=out_ptr, push=push,
                           ctas=ctas, timeout_ns=self._timeout_ns(kern))

    def _run(self, key: str, launch, inputs, outputs) -> None:
        """launch(self.transport); the first time for `key` on the multimem transport, the
        first-use check instead (`transport_check`): multimem, then p2p on the same input, the
        verdict agreed by every rank, p2p from then on if any rank saw a mismatch."""
        if self.transport != "multimem" or key in self._checked:
            launch(self.transport)
            return
        if torch.cuda.is_current_stream_capturing():
            raise WeavelmError(f"{self.name} communicator: its first {key} call checks multimem "
                               "against p2p and cannot be captured; run the same shapes once "
                               "before capturing")
        got = transport_check.run(transport_check.first_use_steps(launch, inputs, outputs))
        problem = transport_check.mismatch(got, outputs, self.world_size, key)
        self._checked.add(key)
        problem = self._agree(problem)
        if problem is not None:
            transport_check.fall_back(f"rank {self.rank}: {problem}")
            self.transport = "p2p"

    def _agree(self, problem: str | None) -> str | None:
        """The first-use verdict of every rank: a problem if any rank saw one (all ranks must
        switch transport together, or their kernels would wait for each other in vain)."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return problem
        flag = torch.tensor([0.0 if problem is None else 1.0], device=self.state.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.state.group)
        if problem is None and float(flag.item()) > 0:
            return "a mismatch on another rank"
        return problem

    def _supported(self, x, weight=None) -> bool:
        d = x.shape[-1] if x.dim() else 0
        ok = (x.device == self.state.device and x.dtype in K.DTYPES and x.is_contiguous() and d > 0
              and (d * x.element_size()) % 16 == 0 and d * x.element_size() // 16 <= K.MAX_VEC)
        if weight is not None:
            ok = ok and d % 8 == 0 and weight.dtype == x.dtype and weight.is_contiguous()
        return ok

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, x, ctas: int | None = None):
        if self.world_size == 1 or x.numel() == 0:
            return x
        if not self._supported(x):
            return self._torch.all_reduce(x)
        self.check_errors(sync=False)
        ctas, dt, n = ctas or self.ctas, K.DTYPES[x.dtype], self.world_size
        total = x.numel() * x.element_size() // 16
        off, in_buf = self._stage(x)
        if total * 16 <= self.oneshot_max_bytes:
            out = torch.empty_like(x) if in_buf else x
            self._run("one-shot all-reduce",
                      lambda t: self._allreduce(t, dt, x_off=off, v_start=0, n_vecs=total,
                                                max_vecs=total, out_ptr=out.data_ptr(),
                                                push=False, ctas=ctas), [], [out])
            return out
        s, e = row_range(total, self.rank, n)
        staged = self.buf.view(x.numel(), 1, x.dtype, off)
        self._run("two-shot all-reduce",
                  lambda t: self._allreduce(t, dt, x_off=off, v_start=s, n_vecs=e - s,
                                            max_vecs=-(-total // n), out_ptr=0, push=True,
                                            ctas=ctas), [staged], [staged])
        if not in_buf:
            x.copy_(self.buf.view(x.numel(), 1, x.dtype).view(x.shape))
        return x

    def reduce_scatter_add_rms_norm_all_gather(self, x, residual_rows, weight, eps,
                                               ctas: int | None = None, slot: int = 0):
        """x [T, D] partial sums (ideally `staging(T, D)`); residual_rows [rows(T), D] updated
        in place. Returns the normalised [T, D]: a view of staging slot `slot` (see module
        doc), valid until the next collective on the same slot."""
        if not self._supported(x, weight) or x.dim() != 2:
            return super().reduce_scatter_add_rms_norm_all_gather(x, residual_rows, weight, eps)
        self.check_errors(sync=False)
        T, D = x.shape
        s, e = row_range(T, self.rank, self.world_size)
        if tuple(residual_rows.shape) != (e - s, D) or residual_rows.dtype != x.dtype \
                or not residual_rows.is_contiguous():
            raise WeavelmError(f"residual_rows must be a contiguous [{e - s}, {D}] {x.dtype} "
                               f"tensor (rank {self.rank}'s rows {s}:{e} of {T}), got "
                               f"{tuple(residual_rows.shape)} {residual_rows.dtype}")
        if T == 0:
            return x
        inbox_off = -1
        if self.scatter and self.world_size > 1:
            self.reserve_slots(T, D, x.dtype, slots=slot + 1)  # places the inboxes
            inbox_off = self._slot_base(slot) + self.slot_bytes
        off, _ = self._stage(x, slot)
        n_vec = D * x.element_size() // 16
        y = self.buf.view(T, D, x.dtype, off)  # x in place: the output overwrites it
        self._run("fused op",
                  lambda t: self._fused(K.DTYPES[x.dtype], x_off=off, n_vec=n_vec, row_start=s,
                                        n_rows=e - s, max_rows=-(-T // self.world_size),
                                        has_residual=True,
                                        res_ptr=residual_rows.data_ptr() if e > s
                                        else weight.data_ptr(),
                                        w_ptr=weight.data_ptr(), out_ptr=0, eps=eps, push=True,
                                        ctas=ctas or self.ctas, inbox_off=inbox_off, n_total=T,
                                        transport=t),
                  [y, residual_rows], [y, residual_rows])
        return y

    # -- the rest: torch collectives ---------------------------------------------------------
    def reduce_scatter(self, x):
        return self._torch.reduce_scatter(x)

    def all_gather(self, x_rows, n_rows):
        return self._torch.all_gather(x_rows, n_rows)

    def all_gather_last_dim(self, x):
        return self._torch.all_gather_last_dim(x)

    def broadcast(self, x, src=0):
        return self._torch.broadcast(x, src)


class P2PCommunicator(FusedCommunicator):
    """Fused kernels that read and write peers' buffers directly (NVLink P2P)."""

    name = "p2p"
    transport = "p2p"


class MultimemCommunicator(FusedCommunicator):
    """Fused kernels on a CUDA multicast address (NVLink SHARP). Refuses to exist unless
    `multicast_allowed()`: never constructed on machines where multicast is switched off."""

    name = "multimem"
    transport = "multimem"

    def _check_transport(self) -> None:
        index = self.state.device.index if self.state.device.index is not None else 0
        allowed, reason = multicast_allowed(index)
        if not allowed:
            raise WeavelmError(f"the multimem communicator is refused: {reason}; use 'p2p' or "
                               "'auto'")
        if torch.cuda.get_device_capability(index) < (9, 0):
            raise WeavelmError("the multimem communicator needs sm_90 or newer (Hopper)")
