"""Low-overhead launching of Numba kernels on torch's current stream.

Why: numba's default launch path does costly host work on every call (typeof, argument
marshalling, stream wrapping); calling `cuda.core.launch` on the compiled function directly skips
it and costs less host time than torch's own elementwise op (benchmarks/RESULTS.md, host launch
overhead). So every weavelm kernel takes only uint64 pointers, int64 and float64 scalars
(all 8-byte parameters, which cuda.core marshals from plain Python ints and floats), is compiled
once for one eager signature, and is launched through `Kernel.launch`:

    k = kernel(("rmsnorm", "bf16", 4), build, signature)  # cached per key; build() -> pyfunc
    k.launch(grid, block, device_index, x.data_ptr(), ..., n_rows, eps)

Two launch paths, chosen per kernel (`Kernel.path`) or globally (the environment variable
`WEAVELM_LAUNCH_PATH=core|numba`):
* "core": `cuda.core.launch(stream, config, cufunc.kernel, *args)` with the cuda.core Stream
  cached per torch stream handle and the LaunchConfig cached per (grid, block). If it fails, the
  kernel logs a warning and switches to "numba" for good.
* "numba": `dispatcher[grid, block, stream](*args)` with the numba stream cached per handle.
Both launch on torch's current stream, so both are captured by `torch.cuda.CUDAGraph` (kernel
arguments, pointers included, are frozen at capture; compile and warm up before capturing).

Under the CUDA simulator both paths run the kernel in Python (`dispatcher[grid, block](*args)`).

Programmatic dependent launch (PDL, Hopper): a kernel built for it (`pdl_enabled`, its key
and build carry the flag) calls `ptx.grid_dep_wait` then `ptx.grid_dep_launch` on entry, before
any read of what earlier kernels wrote and before any write (only static data, e.g. weights,
may be touched before the wait), and the "core" path launches it with
`programmatic_stream_serialization`: its CTAs start while the kernel before it finishes, so
the launch and ramp of a short kernel overlap its predecessor's tail, in CUDA graphs too (a
decode step is ~330 kernels; at one token each gap cost ~0.5 µs on an H100; with it the FP8
step at batch 1 took 3,724 -> 3,549 µs, with the GEMV's early weight requests). Launched any
other way, the wait returns at once and the kernel runs as before. On by default where it
can be (Hopper, the "core" path); `WEAVELM_PDL=0` turns it off.
"""
from __future__ import annotations

import logging
import os

from weavelm.kernels._numba_compat import ensure_torch_context, numba_cuda, simulator_enabled
from weavelm.kernels.common import remember

log = logging.getLogger(__name__)

PATHS = ("core", "numba")
_default_path = os.environ.get("WEAVELM_LAUNCH_PATH", "core")
if _default_path not in PATHS:
    raise ValueError(f"WEAVELM_LAUNCH_PATH must be one of {PATHS}, got {_default_path!r}")


def default_path() -> str:
    return _default_path


# ----------------------------------------------------------------------------- streams, configs

_core_streams: dict[int, object] = {}  # torch stream handle -> cuda.core Stream
_numba_streams: dict[int, object] = {}  # torch stream handle -> numba external stream
_configs: dict[tuple, object] = {}  # (grid, block, pdl) -> cuda.core LaunchConfig
# all three bounded by `common.remember`: token counts vary per step; rebuilding an entry is cheap

_raw_stream = None  # torch's current raw stream handle getter, resolved on first use


def current_stream_handle(device: int) -> int:
    """Raw cudaStream_t of torch's current stream on `device` (the private API when torch has
    it: a plain int, no Stream object built per call)."""
    global _raw_stream
    if _raw_stream is None:
        import torch

        getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        _raw_stream = getter or (lambda d: torch.cuda.current_stream(d).cuda_stream)
    return _raw_stream(device)


_outgrown: list = []    # workspaces replaced by larger ones that a captured graph may point at


def stream_key(t, device: int) -> tuple:
    """(device, stream) of a kernel call on t: a workspace each, since calls on one stream run
    one after the other (the weave's two streams each get their own, a CUDA graph's capture
    stream too, its workspace allocated and zeroed inside the capture)."""
    if not t.is_cuda:
        return str(t.device), 0          # the simulator
    return str(t.device), current_stream_handle(device)


def stream_workspace(memo: dict, key, fits, make):
    """memo[key] where fits(it), else make()'s, stored there (key from `stream_key`, with
    whatever else sizes it). The memo is never emptied and an outgrown workspace is kept
    alive: a captured graph may still point at it."""
    w = memo.get(key)
    if w is None or not fits(w):
        if w is not None:
            _outgrown.append(w)
        w = memo[key] = make()
    return w


def split_k_workspace(memo: dict, key: tuple, floats: int, counters: int):
    """(fp32 partials of at least `floats`, `counters` int32 counters, all 0) of a split-K
    kernel (`fp8_mma`, `fp8_wgmma`): `stream_workspace` under key (the layer's rows, then a
    `stream_key`), grown to the most partials asked. The kernels set their counters back to
    0 as they finish, so a set serves every call on its stream."""
    import torch

    device = key[-2]
    return stream_workspace(
        memo, key, lambda w: w[0].numel() >= floats,
        lambda: (torch.empty(floats, dtype=torch.float32, device=device),
                 torch.zeros(counters, dtype=torch.int32, device=device)))


def _core_stream(handle: int):
    s = _core_streams.get(handle)
    if s is None:
        from cuda.core import Stream

        s = remember(_core_streams, handle, Stream.from_handle(handle))  # borrowed, not owned
    return s


def _numba_stream(handle: int):
    s = _numba_streams.get(handle)
    if s is None:
        # One object per handle, so numba's configure() cache (keyed on the stream) hits.
        s = remember(_numba_streams, handle, numba_cuda().external_stream(handle))
    return s


def _core_launch(stream, config, kern, *args):
    """`cuda.core.launch`, imported on first use (rebinds this module-level name)."""
    global _core_launch
    from cuda.core import launch

    _core_launch = launch
    launch(stream, config, kern, *args)


def _config(grid: int, block: int, pdl: bool = False):
    c = _configs.get((grid, block, pdl))
    if c is None:
        from cuda.core import LaunchConfig

        c = remember(_configs, (grid, block, pdl), LaunchConfig(
            grid=grid, block=block, **({"programmatic_stream_serialization": True} if pdl else {})))
    return c


_pdl: dict[int, bool] = {}
# CUDA graphs keep programmatic edges from driver 12.3 on: an older one would fail at capture.
PDL_MIN_DRIVER = 12030


def driver_version() -> int:
    """The CUDA driver's version (e.g. 13000), or a large number where it cannot be read (the
    launch configuration's own check then decides)."""
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        return int(version) if int(err) == 0 else 1 << 30
    except Exception:  # noqa: BLE001 - no bindings or no driver library: not ours to decide
        return 1 << 30


def pdl_enabled(device: int) -> bool:
    """Whether kernels on `device` are built and launched for programmatic dependent launch:
    compute capability 9.0+, a driver from PDL_MIN_DRIVER on, the "core" launch path with a
    cuda.core that offers it, not the simulator, and not WEAVELM_PDL=0."""
    ok = _pdl.get(device)
    if ok is None:
        ok = False
        if os.environ.get("WEAVELM_PDL", "1") != "0" and _default_path == "core" \
                and not simulator_enabled():
            import torch

            if torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (9, 0) \
                    and driver_version() >= PDL_MIN_DRIVER:
                try:
                    _config(1, 32, True)
                    ok = True
                except (ImportError, TypeError) as e:       # an older cuda.core
                    log.info("no programmatic dependent launch (%s)", e)
        _pdl[device] = ok
    return ok


# ----------------------------------------------------------------------------- kernels

class Kernel:
    """One Numba kernel for one eager signature, compiled on first launch, launched cheaply.

    `build()` returns the kernel's Python function; `signature` is a numba signature string of
    8-byte parameters, e.g. "void(uint64, uint64, int64, float64)". `max_threads` becomes the
    kernel's launch bound (`.maxntid`), which caps its registers so that block size launches;
    `min_blocks` (with max_threads) asks ptxas to fit that many CTAs per SM (`.minnctapersm`):
    fewer registers per thread, more CTAs resident.
    """

    def __init__(self, name: str, build, signature: str, max_threads: int | None = None,
                 min_blocks: int | None = None, pdl: bool = False):
        self.name, self._build, self.signature = name, build, signature
        self.max_threads, self.min_blocks = max_threads, min_blocks
        self.pdl = pdl  # built for programmatic dependent launch: launch it so
        self.path: str | None = None  # None: follow default_path()
        self._dispatcher = None
        self._cufuncs: dict[int, object] = {}  # device index -> cuda.core Kernel
        self._sim = simulator_enabled()

    @property
    def dispatcher(self):
        """The numba dispatcher (compiles for the eager signature on first access, on a GPU)."""
        if self._dispatcher is None:
            cuda = numba_cuda()
            opts = {} if self._sim else self._bounds()
            self._dispatcher = cuda.jit(self.signature, **opts)(self._build())
        return self._dispatcher

    def compile(self, device: int = 0):
        """Compile and load the kernel on `device` now (do it before CUDA-graph capture)."""
        if not self._sim:
            self._load_cufunc(device)
        return self.dispatcher

    def _load_cufunc(self, device: int):
        """The cuda.core Kernel of our compiled overload on `device` (one device per process)."""
        ensure_torch_context(device)  # torch owns the context before numba's first driver call
        overload = next(iter(self.dispatcher.overloads.values()))
        # numba-cuda 0.30 internals: the loaded CUfunction of the overload wraps a cuda.core Kernel.
        kern = self._cufuncs[device] = overload._codelibrary.get_cufunc().kernel
        return kern

    def blocks_per_sm(self, block: int, device: int = 0, default: int = 1) -> int:
        """CTAs of `block` threads that fit on one SM at once (the driver's occupancy of the
        compiled kernel: registers, static shared memory); `default` under the simulator or
        where the query fails. Compiles the kernel on first use."""
        if self._sim:
            return default
        try:
            kern = self._cufuncs.get(device) or self._load_cufunc(device)
            return max(1, int(kern.occupancy.max_active_blocks_per_multiprocessor(block, 0)))
        except Exception as e:  # noqa: BLE001 - cuda.core API differences: keep launching
            log.warning("occupancy query of %s failed (%s: %s); assuming %d CTA(s) per SM",
                        self.name, type(e).__name__, e, default)
            return default

    def ptx(self, cc=(9, 0, "a")) -> str:
        """PTX of this kernel for `cc`, compiled without a GPU (always pass cc: see research)."""
        from numba.cuda.core import sigutils

        args, _ = sigutils.normalize_signature(self.signature)
        ptx, _ = numba_cuda().compile_ptx(self._build(), args, cc=cc, **self._bounds())
        return ptx

    def _bounds(self) -> dict:
        if not self.max_threads:
            return {}
        return {"launch_bounds": (self.max_threads, self.min_blocks) if self.min_blocks
                else self.max_threads}

    def launch(self, grid: int, block: int, device: int, *args) -> None:
        """Launch on torch's current stream of `device`; args are ints (pointers) and floats."""
        if (self.path or _default_path) == "core" and not self._sim:
            try:
                kern = self._cufuncs.get(device) or self._load_cufunc(device)
                _core_launch(_core_stream(current_stream_handle(device)),
                             _config(grid, block, self.pdl), kern, *args)
                return
            except Exception as e:  # noqa: BLE001 - private API; keep the numba path working
                if self._dispatcher is None:
                    raise  # compilation failed: not a launch-path problem
                log.warning("cuda.core launch of %s failed (%s: %s); using numba's launch path",
                            self.name, type(e).__name__, e)
                self.path = "numba"
        self.launch_numba(grid, block, device, *args)

    def launch_numba(self, grid: int, block: int, device: int, *args) -> None:
        """numba's own launch path (slower host side; kept as fallback and for benchmarks)."""
        if self._sim:
            self.dispatcher[grid, block](*args)
            return
        ensure_torch_context(device)
        self.dispatcher[grid, block, _numba_stream(current_stream_handle(device))](*args)


_kernels: dict[tuple, Kernel] = {}


def kernel(key: tuple, build, signature: str, max_threads: int | None = None,
           min_blocks: int | None = None, pdl: bool = False) -> Kernel:
    """The cached Kernel for `key` (e.g. (op, dtype, shape class)); `build` runs on first launch.
    `pdl`: built for programmatic dependent launch (part of the key: the build differs)."""
    key = key + ("pdl",) if pdl else key
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = Kernel("/".join(map(str, key)), build, signature, max_threads,
                                   min_blocks, pdl)
    return k
