"""Hopper warpgroup tensor-core primitives (sm_90a): the inline PTX of `fp8_wgmma.py`.

Kept beside `ptx.py` (whose factory and conventions they use) because a warpgroup product has
an operand count of its own (up to 32 results, 21 operands) and a shape per width.

* `shared_address(arr)`: the shared-window address (32 bits) of a `cuda.shared.array`, what a
  wgmma matrix descriptor holds (`cvta.to.shared`).
* `fence_proxy_async_shared()`: `fence.proxy.async.shared::cta` - shared-memory stores made by
  this thread are seen by the tensor cores' (async proxy) reads after the next barrier.
* `cp_async_4(dst, src, size)`, `cp_async_commit()`, `cp_async_wait(pending)`: 4-byte copies
  global -> shared that hold no registers while in flight (the kernel stages the tokens with
  them), grouped, and the wait for all but the `pending` newest groups.
* `wgmma_fp8_steps(n)`: an intrinsic issuing four `wgmma.mma_async.m64n{n}k32.f32.e4m3.e4m3`
  into a fresh accumulator (A from registers, B from shared memory), then waiting for them:
  when it returns the sums are in the registers, so nothing the compiler schedules around it
  can see a register still being written (each call costs the products' latency; the kernel
  keeps other warpgroups' loads in flight meanwhile).

Under the CUDA simulator `shared_address` is 0 (a descriptor's addresses are then offsets in the
one shared array the model is handed) and the products are modelled in `sim_wgmma_fp8_steps`
from the fragment and shared-memory layouts the PTX ISA gives (CUTLASS's `ALayout_64x32`,
`CLayout_64xN` and the K-major no-swizzle canonical layout spell out the same).
"""
from __future__ import annotations

import numpy as np

from weavelm.kernels import ptx
from weavelm.kernels.ptx_sim import _e4m3_table

STEPS = 4                            # wgmma k32 instructions a call (128 bytes of K)

if ptx.SIMULATOR:
    shared_address = ptx._sim_model("shared_address", "", lambda arr: 0)
else:
    from llvmlite import ir
    from numba import types

    def _sig_shared_address(arr):
        return types.uint32(arr) if isinstance(arr, types.Array) else None

    def _cg_shared_address(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        generic = builder.ptrtoint(ary.data, ir.IntType(64))
        asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.IntType(64)]),
                           "{ .reg .u64 s; cvta.to.shared.u64 s, $1; cvt.u32.u64 $0, s; }",
                           "=r,l", side_effect=False)
        return builder.call(asm, [generic])

    shared_address = ptx._ir(
        "shared_address", "The shared-window address (u32) of a shared array's first byte.",
        _sig_shared_address, _cg_shared_address, model=None)

fence_proxy_async_shared = ptx._asm(
    "fence_proxy_async_shared", "fence.proxy.async.shared::cta;", (), (), memory=True,
    model=lambda: None)

# Global -> shared without registers (4 bytes; src_size 0 writes zeros and reads nothing), a
# group of them closed, and the wait for groups. The copies are the generic proxy's: the tensor
# cores see them after the wait, `fence_proxy_async_shared` and a barrier.
cp_async_4 = ptx._asm("cp_async_4", "cp.async.ca.shared.global [$0], [$1], 4, $2;", (),
                      ("u32", "u64", "u32"), memory=True)
cp_async_commit = ptx._asm("cp_async_commit", "cp.async.commit_group;", (), (), memory=True,
                           model=lambda: None)
_waits: dict = {}


def cp_async_wait(pending: int):
    """The intrinsic waiting until at most `pending` of this thread's committed groups of
    copies are still in flight (`cp.async.wait_group pending`)."""
    f = _waits.get(pending)
    if f is None:
        f = _waits[pending] = ptx._asm(f"cp_async_wait_{pending}",
                                       f"cp.async.wait_group {pending};", (), (), memory=True,
                                       model=lambda: None)
    return f


_steps: dict = {}


def wgmma_fp8_steps(n: int):
    """The intrinsic f(a_0 .. a_15, desc_0 .. desc_3, one) -> (d_0 .. d_{n/2-1}): four
    m64n{n}k32 e4m3 products summed into a fresh fp32 accumulator fragment (d_v: row 16 warp +
    g + 8 (v >> 1 & 1), column 8 (v >> 2) + 2 q + (v & 1), lane = 4 g + q), a_{4i..4i+3}
    product i's A fragment (a0: row g, k 4q..4q+3; a1: row g + 8; a2, a3: k + 16), desc_i
    product i's B descriptor, `one` = 1 (the scale-d predicates: the first product overwrites,
    the others add). Fresh because Hopper's FP8 products accumulate with ~14 bits kept (the
    fast mode): the caller adds each call's 128 of K into its own fp32 sums, as CUTLASS's FP8
    main loop promotes every 4 products."""
    f = _steps.get(n)
    if f is None:
        f = _steps[n] = _make_steps(n)
    return f


def _make_steps(n: int):
    acc = n // 2
    if ptx.SIMULATOR:
        return ptx._sim_model(f"wgmma_fp8_steps_n{n}", "", None)   # modelled by the caller
    d = ", ".join(f"${i}" for i in range(acc))
    a0, s0 = acc, acc + 4 * STEPS                             # first A word, first descriptor
    one = s0 + STEPS
    lines = ["{ .reg .pred p, z;", f"setp.ne.b32 p, ${one}, 0;", f"setp.eq.b32 z, ${one}, 0;",
             "wgmma.fence.sync.aligned;"]
    for i in range(STEPS):
        a = ", ".join(f"${a0 + 4 * i + j}" for j in range(4))
        lines.append(f"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3 {{{d}}}, {{{a}}}, "
                     f"${s0 + i}, {'z' if i == 0 else 'p'}, 1, 1;")
    lines += ["wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 0; }"]
    text = " ".join(lines)
    f32, u32, u64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    fnty = ir.FunctionType(ir.LiteralStructType([f32] * acc),
                           [u32] * (4 * STEPS) + [u64] * STEPS + [u32])
    constraints = ",".join(["=f"] * acc + ["r"] * (4 * STEPS) + ["l"] * STEPS
                           + ["r", "~{memory}"])
    arg_types = [types.uint32] * (4 * STEPS) + [types.uint64] * STEPS + [types.uint32]
    ret = types.UniTuple(types.float32, acc)

    def typer(typingctx, *args):
        if len(args) != len(arg_types):
            return None
        sig = ret(*arg_types)

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(fnty, text, constraints, side_effect=True)
            r = builder.call(asm, list(args))
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(r, i) for i in range(acc)])
        return sig, codegen

    return ptx._make_intrinsic(typer, len(arg_types), f"wgmma_fp8_steps_n{n}",
                               wgmma_fp8_steps.__doc__)


def desc_fields(desc: int) -> tuple[int, int, int]:
    """(start address, leading byte offset, stride byte offset) of a no-swizzle descriptor."""
    desc = int(desc)
    return ((desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4)


def sim_wgmma_fp8_steps(frag, cd, smem, descs, n: int, t0: int) -> None:
    """The warpgroup of threads t0 .. t0 + 127 runs `wgmma_fp8_steps(n)`: frag holds each
    thread's 16 A words (16 a thread, from thread 0 of the CTA), cd receives its n / 2 sums of
    the four products (fresh: the caller adds them to its own), smem the shared array the
    descriptors point into (its byte offsets are the addresses). B is K-major, no swizzle: element (column j, k) of product i at byte
    start_i + (k // 16) LBO + (j // 8) SBO + (j % 8) 16 + k % 16."""
    acc = n // 2
    table = _e4m3_table()
    raw = np.asarray(smem).view(np.uint8)
    words = np.asarray(frag[t0 * 16:(t0 + 128) * 16], dtype=np.uint32).reshape(128, STEPS, 4)
    codes = words.view(np.uint8).reshape(128, STEPS, 4, 4)         # [thread, i, reg, byte]
    total = np.zeros((64, n), np.float64)
    for i in range(STEPS):
        a = np.zeros((64, 32), np.float64)
        for th in range(128):
            w, g, q = th >> 5, (th & 31) >> 2, th & 3
            for reg in range(4):
                row = 16 * w + g + 8 * (reg & 1)
                k = 4 * q + 16 * (reg >> 1)
                a[row, k:k + 4] = table[codes[th, i, reg]]
        start, lbo, sbo = desc_fields(descs[i])
        b = np.zeros((n, 32), np.float64)
        for j in range(n):
            for half in range(2):
                at = start + half * lbo + (j // 8) * sbo + (j % 8) * 16
                b[j, 16 * half:16 * half + 16] = table[raw[at:at + 16]]
        total += a @ b.T                                      # exact products, summed in f64
    out = np.empty((128, acc), np.float32)
    for th in range(128):
        w, g, q = th >> 5, (th & 31) >> 2, th & 3
        for v in range(acc):
            row = 16 * w + g + 8 * ((v >> 1) & 1)
            col = 8 * (v >> 2) + 2 * q + (v & 1)
            out[th, v] = np.float32(total[row, col])
    cd[t0 * acc:(t0 + 128) * acc] = out.reshape(-1)
