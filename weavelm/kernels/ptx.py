"""PTX primitives as Numba intrinsics: with `ptx_wgmma.py` (Hopper warpgroup products, built
on this factory), the only inline PTX in weavelm.

Each primitive is named after what it does; its docstring gives the exact PTX it emits. They are
made by one factory (`_asm`; `_load` and `_store` for its loads and stores) from a PTX template,
the operand kinds, and whether the instruction orders memory. Operand kinds map to numba types,
LLVM types and asm constraints in `_KINDS`.

Conventions
* Addresses are `uint64` global (or peer, or multicast) virtual addresses; 16-byte accesses need
  16-byte alignment. Peer pointers are plain UVA addresses, so the same loads and stores serve
  local and peer memory; the `volatile` variants are for peer data that must not be served from a
  stale L1 line.
* A 16-byte vector travels as a 4-tuple of `uint32` words (lowest address first).
* Memory-ordering asm (flags, fences, atomics, multimem, stores) is `side_effect=True` with a
  `~{memory}` clobber, so LLVM neither reorders, merges nor drops it. `%globaltimer` reads are
  `side_effect=True` too (two reads must not be merged).
* In LLVM inline asm `$N` is operand N and a literal `$` would be `$$`; none is needed here.

Under the CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`) intrinsics cannot run, so every name is bound
to a plain-Python model instead (`ptx_sim.py`): memory primitives read and write host memory at
the address (the simulator's "device" memory is host memory, so a kernel handed
`tensor.data_ptr()` of CPU tensors runs unchanged); conversions are modelled bit-exactly with
numpy. Multimem instructions act on an emulated multicast object (`multicast_sim.py`: a
multicast address is a group table of every rank's buffer and an offset).
"""
from __future__ import annotations

from weavelm.kernels import multicast_sim
from weavelm.kernels._numba_compat import simulator_enabled
from weavelm.kernels.ptx_sim import (
    _bits_f32, _sim_atom_add, _sim_atom_cas, _sim_fence, _sim_globaltimer,
    _sim_ld_u32, _sim_ld_u64, _sim_ld_v2, _sim_ld_v4, _sim_pack_bf16x2, _sim_pack_e4m3x4,
    _sim_pack_f16x2, _sim_red_add, _sim_st_u32, _sim_st_v4, _sim_unpack_bf16x2,
    _sim_unpack_e4m3x4, _sim_f32_as_u32, _sim_unpack_f16x2, _sim_e4m3x4_to_f16x2,
    _sim_low_halves, _sim_high_halves,
)

SIMULATOR = simulator_enabled()

# ----------------------------------------------------------------------------- factory

if not SIMULATOR:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    # kind -> (numba type, LLVM type, inline-asm constraint)
    _KINDS = {
        "u32": (types.uint32, ir.IntType(32), "r"),
        "u64": (types.uint64, ir.IntType(64), "l"),
        "f32": (types.float32, ir.FloatType(), "f"),
    }


def _accepts(kind, ty) -> bool:
    """Typing-time check: integers for integer operands, any number for f32 operands."""
    if kind == "f32":
        return isinstance(ty, (types.Float, types.Integer))
    return isinstance(ty, types.Integer)


def _asm(name: str, ptx: str, outs: tuple, ins: tuple, *, memory: bool, model=None, doc="",
         side_effect: bool | None = None):
    """Make the intrinsic `name` emitting `ptx` with result kinds `outs` and operand kinds `ins`.

    Operands are numbered results first (`$0..`), then inputs. `memory` marks memory-ordering
    asm: side effects plus a `~{memory}` clobber; `side_effect=True` alone keeps an instruction
    with no result (a prefetch) without ordering memory around it. Under the simulator, returns
    `model` (or a stub raising NotImplementedError when there is none).
    """
    doc = (doc + "\n\n" if doc else "") + \
        f"Emits `{ptx}`  ({', '.join(outs) or 'void'} <- {', '.join(ins) or '()'})"
    if SIMULATOR:
        return _sim_model(name, doc, model)

    constraints = ",".join([f"={_KINDS[k][2]}" for k in outs] + [_KINDS[k][2] for k in ins]
                           + (["~{memory}"] if memory else []))
    out_llty = [_KINDS[k][1] for k in outs]
    if not outs:
        ret, asm_ret = types.void, ir.VoidType()
    elif len(outs) == 1:
        ret, asm_ret = _KINDS[outs[0]][0], out_llty[0]
    else:
        ret = types.Tuple([_KINDS[k][0] for k in outs])
        asm_ret = ir.LiteralStructType(out_llty)
    fnty = ir.FunctionType(asm_ret, [_KINDS[k][1] for k in ins])

    def typer(typingctx, *args):
        if len(args) != len(ins) or not all(_accepts(k, t) for k, t in zip(ins, args)):
            return None  # numba reports "no matching definition" with the argument types
        sig = ret(*[_KINDS[k][0] for k in ins])  # numba casts the actual arguments to these

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(fnty, ptx, constraints,
                               side_effect=memory if side_effect is None else side_effect)
            r = builder.call(asm, list(args))
            if not outs:
                return context.get_dummy_value()
            if len(outs) == 1:
                return r
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(r, i) for i in range(len(outs))])
        return sig, codegen

    return _make_intrinsic(typer, len(ins), name, doc)


def _sim_model(name: str, doc: str, model):
    """A function named `name` running `model` (shared models get one wrapper per primitive)."""
    def run(*args):
        if model is None:
            raise NotImplementedError(f"ptx.{name} has no CUDA-simulator model")
        return model(*args)
    run.__name__, run.__qualname__ = name, name
    run.__doc__ = doc + "\n\nUnder the CUDA simulator: a plain-Python model."
    return run


def _make_intrinsic(typer, arity: int, name: str, doc: str):
    """`intrinsic(typer)`, with `typer` given `arity` named parameters.

    numba folds call arguments against the typer's Python signature; `*args` breaks that, so the
    generic typer is wrapped in one with explicit parameters.
    """
    params = "".join(f", a{i}" for i in range(arity))
    ns = {"_typer": typer}
    exec(f"def {name}(typingctx{params}):\n    return _typer(typingctx{params})\n", ns)
    fn = ns[name]
    fn.__doc__ = doc
    return intrinsic(fn)


def _ir(name: str, doc: str, sig_fn, codegen_fn, *, model):
    """An intrinsic from plain LLVM IR (no asm), e.g. bit casts; `model` under the simulator."""
    if SIMULATOR:
        return _sim_model(name, doc, model)

    def typer(typingctx, *args):
        sig = sig_fn(*args)
        return (sig, codegen_fn) if sig is not None else None
    return _make_intrinsic(typer, 1, name, doc)


# ----------------------------------------------------------------------------- loads and stores

def _load(name: str, op: str, words: int, *, memory: bool):
    """`op` (e.g. "ld.global.nc") of one u32 (words=1) or one 16-byte vector (4 words)."""
    dst, ty = ("$0", ".u32") if words == 1 else ("{$0, $1, $2, $3}", ".v4.u32")
    return _asm(name, f"{op}{ty} {dst}, [${words}];", ("u32",) * words, ("u64",), memory=memory,
                model=_sim_ld_u32 if words == 1 else _sim_ld_v4)


def _store(name: str, op: str, words: int):
    """`op` (e.g. "st.global") of one u32 (words=1) or one 16-byte vector (4 words)."""
    src, ty = ("$1", ".u32") if words == 1 else ("{$1, $2, $3, $4}", ".v4.u32")
    return _asm(name, f"{op}{ty} [$0], {src};", (), ("u64",) + ("u32",) * words, memory=True,
                model=_sim_st_u32 if words == 1 else _sim_st_v4)


# Not side-effecting: an ordinary load LLVM may schedule; ordering comes from fences/flags.
load_v4_u32 = _load("load_v4_u32", "ld.global", 4, memory=False)
load_u32 = _load("load_u32", "ld.global", 1, memory=False)
# Read-only (texture) path: only for data no thread writes during the kernel.
load_v4_u32_nc = _load("load_v4_u32_nc", "ld.global.nc", 4, memory=False)
# Read-only, read once (streamed weights): not kept in L1, so the data reused beside it stays.
load_v4_u32_stream = _load("load_v4_u32_stream", "ld.global.nc.L1::no_allocate", 4, memory=False)
# 8 bytes read-only: half a row vector where the cache holds FP8 (paged decode attention)
load_v2_u32_nc = _asm("load_v2_u32_nc", "ld.global.nc.v2.u32 {$0, $1}, [$2];", ("u32",) * 2,
                      ("u64",), memory=False, model=_sim_ld_v2)
# Bring a line into L2 ahead of its load (no result, no ordering): a kernel that must do other
# work before its first streamed load starts the transfer first.
prefetch_l2 = _asm("prefetch_l2", "prefetch.global.L2 [$0];", (), ("u64",), memory=False,
                   side_effect=True, model=lambda addr: None)
store_v4_u32 = _store("store_v4_u32", "st.global", 4)
store_u32 = _store("store_u32", "st.global", 1)

# Peer memory (raw UVA pointers of other GPUs): volatile so every access goes to memory.
load_v4_u32_volatile = _load("load_v4_u32_volatile", "ld.volatile.global", 4, memory=True)
store_v4_u32_volatile = _store("store_v4_u32_volatile", "st.volatile.global", 4)
load_u32_volatile = _load("load_u32_volatile", "ld.volatile.global", 1, memory=True)
store_u32_volatile = _store("store_u32_volatile", "st.volatile.global", 1)

# Read-only path: tables (e.g. peer pointers) no thread writes while the kernel runs.
load_u64_nc = _asm("load_u64_nc", "ld.global.nc.u64 $0, [$1];", ("u64",), ("u64",),
                   memory=False, model=_sim_ld_u64)

# ----------------------------------------------------------------------------- system-scope flags

store_release_sys_u32 = _store("store_release_sys_u32", "st.release.sys.global", 1)
load_acquire_sys_u32 = _load("load_acquire_sys_u32", "ld.acquire.sys.global", 1, memory=True)
load_relaxed_sys_u32 = _load("load_relaxed_sys_u32", "ld.relaxed.sys.global", 1, memory=True)

atomic_add_sys_u32 = _asm(
    "atomic_add_sys_u32", "atom.global.sys.add.u32 $0, [$1], $2;", ("u32",), ("u64", "u32"),
    memory=True, model=_sim_atom_add)  # relaxed; returns the old value

atomic_add_acq_rel_sys_u32 = _asm(
    "atomic_add_acq_rel_sys_u32", "atom.acq_rel.sys.global.add.u32 $0, [$1], $2;", ("u32",),
    ("u64", "u32"), memory=True, model=_sim_atom_add)

atomic_cas_sys_u32 = _asm(
    "atomic_cas_sys_u32", "atom.global.sys.cas.b32 $0, [$1], $2, $3;", ("u32",),
    ("u64", "u32", "u32"), memory=True, model=_sim_atom_cas)  # (addr, compare, new) -> old

atomic_cas_acq_rel_sys_u32 = _asm(
    "atomic_cas_acq_rel_sys_u32", "atom.acq_rel.sys.global.cas.b32 $0, [$1], $2, $3;", ("u32",),
    ("u64", "u32", "u32"), memory=True, model=_sim_atom_cas)

# Barrier arrival, fire-and-forget. Relaxed: the barrier fences once before it signals every
# rank (fence + strong write = release pattern); `red.release` would fence again before each
# red, and each such fence waits for the previous remote red's acknowledgement over NVLink.
red_add_relaxed_sys_u32 = _asm(
    "red_add_relaxed_sys_u32", "red.relaxed.sys.global.add.u32 [$0], $1;", (), ("u64", "u32"),
    memory=True, model=_sim_red_add)

fence_acq_rel_sys = _asm("fence_acq_rel_sys", "fence.acq_rel.sys;", (), (), memory=True,
                         model=_sim_fence)

globaltimer_ns = _asm("globaltimer_ns", "mov.u64 $0, %globaltimer;", ("u64",), (),
                      memory=True, model=_sim_globaltimer)  # ns since an arbitrary epoch

# Programmatic dependent launch (sm_90+; launcher.pdl_enabled): `grid_dep_launch` lets the
# stream's next kernel start its CTAs now, `grid_dep_wait` blocks until the kernel before this
# one has finished and its writes are visible (at once where this one was launched plainly).
grid_dep_launch = _asm("grid_dep_launch", "griddepcontrol.launch_dependents;", (), (),
                       memory=True, model=lambda: None)
grid_dep_wait = _asm("grid_dep_wait", "griddepcontrol.wait;", (), (), memory=True,
                     model=lambda: None)

# ----------------------------------------------------------------------------- conversions

# cvt.rn.bf16x2.f32 d, a, b puts a in the upper half: we pass (hi, lo) as $1, $2.
pack_bf16x2 = _asm("pack_bf16x2", "cvt.rn.bf16x2.f32 $0, $2, $1;", ("u32",), ("f32", "f32"),
                   memory=False, model=_sim_pack_bf16x2,
                   doc="(lo, hi) f32 -> uint32 of two bf16 (lo in bits 0-15), round to nearest "
                       "even.")

pack_f16x2 = _asm("pack_f16x2", "cvt.rn.f16x2.f32 $0, $2, $1;", ("u32",), ("f32", "f32"),
                  memory=False, model=_sim_pack_f16x2,
                  doc="(lo, hi) f32 -> uint32 of two f16 (lo in bits 0-15), round to nearest "
                      "even.")

unpack_f16x2 = _asm(
    "unpack_f16x2",
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
    ("f32", "f32"), ("u32",), memory=False, model=_sim_unpack_f16x2,
    doc="uint32 of two f16 -> (lo, hi) f32 (exact).")


# FP8 (e4m3, sm_89+): cvt's first source goes to the upper byte, as for bf16x2.
pack_e4m3x4 = _asm(
    "pack_e4m3x4",
    "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
    "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }",
    ("u32",), ("f32", "f32", "f32", "f32"), memory=False, model=_sim_pack_e4m3x4,
    doc="(x0, x1, x2, x3) f32 -> uint32 of four e4m3 (x0 in bits 0-7), round to nearest "
        "even, saturated to +-448.")

unpack_e4m3x4 = _asm(
    "unpack_e4m3x4",
    "{ .reg .b16 lo, hi, a, b, c, d; .reg .b32 h0, h1; mov.b32 {lo, hi}, $4; "
    "cvt.rn.f16x2.e4m3x2 h0, lo; cvt.rn.f16x2.e4m3x2 h1, hi; mov.b32 {a, b}, h0; "
    "mov.b32 {c, d}, h1; cvt.f32.f16 $0, a; cvt.f32.f16 $1, b; cvt.f32.f16 $2, c; "
    "cvt.f32.f16 $3, d; }",
    ("f32", "f32", "f32", "f32"), ("u32",), memory=False, model=_sim_unpack_e4m3x4,
    doc="uint32 of four e4m3 -> (x0, x1, x2, x3) f32 (exact; x0 from bits 0-7).")

# ----------------------------------------------------------------------------- tensor cores

# One warp-wide f16 (bf16) product: every lane passes its fragments as the PTX ISA lays them out
# for m16n8k16 (a: 4 words of f16x2, b: 2 words, c and d: 4 floats). The simulator has no
# warp-wide instructions: `common.warp_mma_fn` models it there. (FP8 operands go through the f16
# one converted: on sm_90 an e4m3 mma.sync is itself converted to f16 mma's, once per use.)
def _mma_m16n8k16(dt: str):
    return _asm(
        f"mma_{dt}_m16n8k16",
        f"mma.sync.aligned.m16n8k16.row.col.f32.{dt}.{dt}.f32 {{$0, $1, $2, $3}}, "
        "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
        ("f32",) * 4, ("u32",) * 6 + ("f32",) * 4, memory=False,
        doc=f"d = a (16 x 16 {dt}, row) b (16 x 8 {dt}, col) + c, fp32 sums; one warp.")


mma_f16_m16n8k16 = _mma_m16n8k16("f16")
mma_bf16_m16n8k16 = _mma_m16n8k16("bf16")

# Two 16-bit halves of two words into one (building a fragment from rows loaded whole).
low_halves = _asm("low_halves", "prmt.b32 $0, $1, $2, 0x5410;", ("u32",), ("u32", "u32"),
                  memory=False, model=_sim_low_halves,
                  doc="(a, b) -> a's low half in bits 0-15, b's low half in bits 16-31.")
high_halves = _asm("high_halves", "prmt.b32 $0, $1, $2, 0x7632;", ("u32",), ("u32", "u32"),
                   memory=False, model=_sim_high_halves,
                   doc="(a, b) -> a's high half in bits 0-15, b's high half in bits 16-31.")

e4m3x4_to_f16x2 = _asm(
    "e4m3x4_to_f16x2",
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
    "cvt.rn.f16x2.e4m3x2 $1, hi; }",
    ("u32", "u32"), ("u32",), memory=False, model=_sim_e4m3x4_to_f16x2,
    doc="uint32 of four e4m3 -> (f16x2 of x0, x1; f16x2 of x2, x3), exact (x0 from bits 0-7).")


def _sig_u32_to_f32x2(w):
    return types.UniTuple(types.float32, 2)(types.uint32) if isinstance(w, types.Integer) else None


def _cg_unpack_bf16x2(context, builder, sig, args):
    i32, f32 = ir.IntType(32), ir.FloatType()
    w = context.cast(builder, args[0], sig.args[0], types.uint32)
    lo = builder.bitcast(builder.shl(w, ir.Constant(i32, 16)), f32)
    hi = builder.bitcast(builder.and_(w, ir.Constant(i32, 0xFFFF0000)), f32)
    return context.make_tuple(builder, sig.return_type, [lo, hi])


unpack_bf16x2 = _ir(
    "unpack_bf16x2",
    "uint32 holding two bf16 -> (lo, hi) f32. No asm: `shl.b32 lo, w, 16; and.b32 hi, w, "
    "0xFFFF0000` (bf16 is the top half of an f32).",
    _sig_u32_to_f32x2, _cg_unpack_bf16x2, model=_sim_unpack_bf16x2)


def _cg_bitcast(context, builder, sig, args):
    return builder.bitcast(args[0], context.get_value_type(sig.return_type))


u32_as_f32 = _ir(
    "u32_as_f32", "Reinterpret a uint32's bits as float32 (a register move, no conversion).",
    lambda w: types.float32(types.uint32) if isinstance(w, types.Integer) else None,
    _cg_bitcast, model=_bits_f32)

f32_as_u32 = _ir(
    "f32_as_u32", "Reinterpret a float32's bits as uint32 (a register move, no conversion).",
    lambda x: types.uint32(types.float32) if isinstance(x, (types.Float, types.Integer)) else None,
    _cg_bitcast, model=_sim_f32_as_u32)

# ----------------------------------------------------------------------------- Hopper multimem
# Only valid on a multicast address (cuMulticast*) on sm_90+. Never executed on the shared
# machines (docs/architecture.md, "Why multicast is guarded"): compiled and assembled by the
# tests, and run by the CUDA simulator on an emulated multicast object (`multicast_sim.py`, which
# cites the PTX ISA's semantics).

multimem_ld_reduce_add_v4_bf16x2 = _asm(
    "multimem_ld_reduce_add_v4_bf16x2",
    "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {$0, $1, $2, $3}, [$4];",
    ("u32",) * 4, ("u64",), memory=True,
    model=multicast_sim.ld_reduce_add_v4_bf16x2)  # sum over ranks of 8 bf16, accumulated in f32

multimem_ld_reduce_add_v4_f16x2 = _asm(
    "multimem_ld_reduce_add_v4_f16x2",
    "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2 {$0, $1, $2, $3}, [$4];",
    ("u32",) * 4, ("u64",), memory=True,
    model=multicast_sim.ld_reduce_add_v4_f16x2)  # sum over ranks of 8 f16, accumulated in f32

multimem_ld_reduce_add_v4_f32 = _asm(
    "multimem_ld_reduce_add_v4_f32",
    "multimem.ld_reduce.relaxed.sys.global.add.v4.f32 {$0, $1, $2, $3}, [$4];",
    ("u32",) * 4, ("u64",), memory=True,
    model=multicast_sim.ld_reduce_add_v4_f32)  # words are f32 bits (u32_as_f32 to use them)

multimem_st_v4_f32 = _asm(
    "multimem_st_v4_f32", "multimem.st.relaxed.sys.global.v4.f32 [$0], {$1, $2, $3, $4};",
    (), ("u64",) + ("u32",) * 4, memory=True,
    model=multicast_sim.st_v4)  # 16 bytes to every rank; any payload bits

multimem_red_add_u32 = _asm(
    "multimem_red_add_u32", "multimem.red.relaxed.sys.global.add.u32 [$0], $1;",
    (), ("u64", "u32"), memory=True,
    model=multicast_sim.red_add_u32)  # add to the word on every rank (barrier signal)
