"""The multimem transport's first-use self-check: its first call of each kernel also runs p2p.

The multimem kernels differ from the p2p ones only in three primitives, and p2p is the transport
that has run on real GPUs. So when the multimem backend is selected, the first call of each of
its kernels (fused op, one-shot and two-shot all-reduce) runs twice on the same input: multimem,
then p2p, and the outputs are compared. On a mismatch (on any rank: the ranks agree) one line is
logged and the process uses p2p from then on (`fallback()`); new multimem communicators are made
as p2p ones (`backends.make_communicator`).

    steps = first_use_steps(launch, inputs, outputs)   # launch(transport) runs the op once
    got = run(steps)                                   # one rank: all steps in order
    problem = mismatch(got, outputs, world, what)      # None: the transports agree

The steps are a generator so that the CUDA simulator, which runs ranks one after another, can
run each step on every rank before the next (tests/kernels/test_allreduce_norm_multimem_sim.py).
On GPUs one rank runs them straight through: the kernels' own barriers order the ranks (a
rank's multimem kernel ends only after every peer finished writing into its buffer, and the p2p
kernel starts only after every peer restored its input).

Tolerance (`TOLERANCE`): the switch returns the sum rounded to the element type before the
residual add (p2p keeps it in f32), one extra rounding of at most half an ulp of the sum, and
adds the ranks in an order the PTX ISA leaves open (f32 rounding of the order: about N ulps of
f32). Per element |multimem - p2p| <= rtol * (|p2p| + max |p2p|) with rtol = 4 ulps of the
dtype + 4 N ulps of f32; a broken transport (a rank's partials missing, a wrong row or vector)
is off by the size of a partial sum, hundreds of ulps.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("weavelm")

ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
_fallback: list[str] = []   # the line logged when this process gave up multimem


def tolerance(dtype: torch.dtype, world: int) -> float:
    """rtol of `mismatch` (see the module doc)."""
    return 4 * ULP[dtype] + 4 * world * ULP[torch.float32]


def first_use_steps(launch, inputs, outputs):
    """Generator of one rank's check. `launch(transport)` runs the op on the current inputs;
    `inputs`: tensors the op reads and overwrites (restored between the two runs); `outputs`:
    tensors it writes. Yields after the snapshot of the inputs, after each run and after the
    copy + restore; returns the multimem outputs (copies). The p2p outputs are left in place: the op's
    result either way. (On GPUs a peer writes into this rank's buffer only after this rank's
    kernel passed its start barrier, so after the snapshot.)"""
    saved = [t.clone() for t in inputs]
    yield "saved"
    launch("multimem")
    yield "multimem"
    got = [t.clone() for t in outputs]   # complete once every rank's kernel ran
    for t, s in zip(inputs, saved):
        t.copy_(s)
    yield "restored"
    launch("p2p")
    yield "p2p"
    return got


def run(steps):
    """Run a generator of steps to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def mismatch(got, want, world: int, what: str) -> str | None:
    """None if every multimem output in `got` is within `tolerance` of the p2p one in `want`,
    else a one-line description of the worst element."""
    for i, (g, w) in enumerate(zip(got, want)):
        rtol = tolerance(w.dtype, world)
        g64, w64 = g.double(), w.double()
        scale = float(w64.abs().max()) if w64.numel() else 0.0
        bound = rtol * (w64.abs() + scale)
        diff = (g64 - w64).abs()
        bad = ~(diff <= bound) & ~(g64.isnan() & w64.isnan())
        if bool(bad.any()):
            k = int(bad.flatten().nonzero()[0])
            where = tuple(int(j) for j in torch.unravel_index(torch.tensor(k), w.shape))
            return (f"{what}: output {i} differs from p2p at {where}: {float(g64.flatten()[k]):g} "
                    f"vs {float(w64.flatten()[k]):g} (tolerance {float(bound.flatten()[k]):.3g})")
    return None


def fall_back(problem: str) -> str:
    """Give up multimem for this process: log one line and remember it; returns the line."""
    line = (f"weavelm multimem self-check failed ({problem}); using the p2p transport for the "
            "rest of this process")
    if not _fallback:
        _fallback.append(line)
    log.warning(line)
    return line


def fallback() -> str | None:
    """The line logged when this process fell back from multimem to p2p, or None."""
    return _fallback[0] if _fallback else None


def reset() -> None:
    """Forget a fallback (tests)."""
    _fallback.clear()
