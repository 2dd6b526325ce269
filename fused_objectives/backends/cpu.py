"""The CPU backend: the fused primitives as C++ custom operators (ATen GEMMs + OpenMP epilogues).

The kernels live in ``csrc/fused_objectives_cpu.cpp`` and register two operators under one schema,
``torch.ops.fused_objectives.lse_forward`` and ``torch.ops.fused_objectives.grad_backward``
(visible to the profiler and to ``torch.compile``, which gets shape-only fake kernels here).  They
are compiled on first use with PyTorch's C++ extension machinery (a C++ compiler and ninja) and
cached per user (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), keyed only by
the source text, the flags, the torch version and the CPU: any later process, from any checkout or
virtual environment with the same torch, loads the cached library without a compiler.  Concurrent
first uses are serialised by a file lock (one builds, the others wait and load); while building, one
line goes to stderr (silenced by ``FUSED_OBJECTIVES_QUIET=1``).

Backend contract v2 (z-loss, label smoothing, class weights): ``forward`` returns ``rows [3, N] =
(lse, entropy, dotz)``, the entropy only with ``row_stats`` and ``dotz = sum_j dot_j z_j`` only with a
``dot`` vector (each is one more per-row accumulator in the epilogue, skipped when not asked);
``backward`` takes ``coef`` ``[N]`` (c), ``[2, N]`` (c, b) or ``[3, N]`` (c, b, g) and forms
``dz = c (onehot - p) + b p + g dot`` (times the transforms' derivative), with ``1 - p`` at the
target from the forward's ``logp``.  ``b`` folds into the factor on ``p`` and ``g dot`` is a
compile-time branch, so the classic call (``coef [N]``) runs the loop it always ran.

GEMM dtype: bf16 / fp16 inputs use GEMMs in their own dtype (oneDNN; fp32 accumulation inside,
fp32 row statistics and epilogue) where that is faster than fp32 GEMMs on this CPU, measured once
per process and dtype with a tiny timing (``half_gemm``); elsewhere (e.g. fp16 on CPUs without
native fp16 kernels) they are converted and run in fp32.  ``FUSED_OBJECTIVES_CPU_HALF_GEMM=0|1``
overrides the measurement.  Scalar losses with fp16 inputs always run fp32 GEMMs: their gradients
are formed in the forward (``chunked.py``), before a loss scaler's factor could keep fp16 ``dz``
from underflowing.

Memory: the kernels walk the vocabulary and the active tokens in ``[rows, cols]`` logits tiles whose
size this module plans from a byte budget, so the workspace never grows with ``N * V``:
``FUSED_OBJECTIVES_CPU_BUDGET_MB`` (default 128) bounds all chunk buffers together, and
``FUSED_OBJECTIVES_CPU_TILE_MB`` (default 32, at most half the budget) the logits tile.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..options import LogitOptions
from . import chunked, register_backend

_LIB_NAME = "fused_objectives_cpu"
_SOURCE = "fused_objectives_cpu.cpp"
_MB = 1 << 20

# Tile shape limits: wide vocabulary chunks make few, large GEMMs (and few parallel regions, which
# matters on a shared machine); the epilogue's memory traffic is small next to a GEMM's 2 * H FLOPs
# per logit, so the tile need not stay in cache.
MAX_COLS = 4096
MIN_COLS = 16


def _source_path() -> Optional[Path]:
    """The C++ source: shipped inside the package (wheel), or the repository's csrc/ (editable)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_csrc" / _SOURCE, here.parent / "csrc" / _SOURCE):
        if candidate.is_file():
            return candidate
    return None


def _cflags() -> list:
    # no FP-trap or errno semantics: lets the compiler if-convert and vectorise the epilogue loops
    # (NaN and infinity behave exactly as without these flags; this is not -ffast-math)
    # -ffp-contract=off: no implicit FMAs, so a logit recomputed in the backward rounds exactly as the
    # forward's (the kernels ask for the FMAs they want explicitly)
    flags = ["-O3", "-fopenmp", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # built on the machine that runs it (and cached per CPU, below): use its vector units
        flags.append("-march=native")
    return flags


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_root() -> Path:
    """Per-user build cache: ``TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _missing_tools() -> Optional[str]:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    missing = []
    if shutil.which(cxx) is None:
        missing.append(f"a C++17 compiler ({cxx!r} is not on PATH; e.g. `apt-get install g++`, "
                       f"`dnf install gcc-c++`, or Xcode command line tools on macOS; or set CXX)")
    if not is_ninja_available():
        missing.append("ninja (`pip install ninja`)")
    if not missing:
        return None
    return ("backend='cpu' compiles its C++ kernels on first use and needs " + " and ".join(missing)
            + "; install them, or pass backend='reference' (materialises the [N, V] logits)")


def _quiet() -> bool:
    return os.environ.get("FUSED_OBJECTIVES_QUIET", "") not in ("", "0")


def _build_key(source_text: str, cflags: list) -> str:
    """The cache key: what the library's machine code depends on, and nothing else (no paths)."""
    parts = [source_text, " ".join(cflags), torch.__version__, _cpu_signature()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` across processes (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Loader:
    """Builds (or loads from the cache) the operator library once per process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._error: Optional[str] = None
        self._loaded = False

    def ensure(self) -> Optional[str]:
        """None once the operators are registered, else why they cannot be."""
        if self._loaded or self._error is not None:
            return self._error
        with self._lock:
            if not self._loaded and self._error is None:
                self._error = self._build()
                self._loaded = self._error is None
        return self._error

    @staticmethod
    def _build() -> Optional[str]:
        if hasattr(torch.ops.fused_objectives, "target_logits") and _has_cpu_kernel():
            return None  # registered by another copy of this module (e.g. a reload)
        src = _source_path()
        if src is None:
            return (f"backend='cpu': its C++ source {_SOURCE} is missing from this installation "
                    f"(expected in fused_objectives/_csrc/ or the repository's csrc/); reinstall the "
                    f"package, or pass backend='reference'")
        cflags = _cflags()
        text = src.read_text()
        name = f"{_LIB_NAME}_{_build_key(text, cflags)}"
        root = _cache_root()
        build_dir = root / name
        built = build_dir / f"{name}.so"
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"backend='cpu': cannot create its build cache {root} ({exc}); set TORCH_EXTENSIONS_DIR"
        # one process builds, the others wait here and then load its library
        with _file_lock(root / f"{name}.lock"):
            if built.is_file():
                # a cache hit never calls the compiler: the key covers everything the code depends on
                torch.ops.load_library(str(built))
                return None
            missing = _missing_tools()
            if missing is not None:
                return missing
            return _compile(text, cflags, name, build_dir, src)


def _compile(text: str, cflags: list, name: str, build_dir: Path, src: Path) -> Optional[str]:
    from torch.utils.cpp_extension import load

    if not _quiet():
        print(f"fused_objectives: compiling the CPU kernels (first use with this source, torch and CPU; "
              f"~30 s; cached in {build_dir}) ...", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    # compile a copy inside the build directory: its path, unlike the checkout's, is the same for
    # every process that reaches this key
    local = build_dir / _SOURCE
    if not local.is_file() or local.read_text() != text:
        local.write_text(text)
    # PyTorch's own build baton: a leftover from a process killed mid-build would block forever;
    # under our lock no one else is building this key
    with contextlib.suppress(FileNotFoundError):
        (build_dir / "lock").unlink()
    try:
        load(name=name, sources=[str(local)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
             build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as exc:  # the compiler's output is in the message
        detail = str(exc).strip()
        if len(detail) > 4000:
            detail = detail[:2000] + "\n...\n" + detail[-2000:]
        return (f"backend='cpu' could not build its C++ kernels from {src} ({type(exc).__name__}): "
                f"{detail}\nA C++17 compiler (g++ >= 9 or clang >= 10) and ninja are required; "
                f"or pass backend='reference'")
    return None


def _has_cpu_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_objectives::target_logits", "CPU")


_LOADER = _Loader()


def _constant_at_trace(fn):
    """Under ``torch.compile``, run ``fn`` once while tracing and keep its result as a constant (no
    graph break, nothing of it in the graph): the loader's locks and file I/O, and the one-off GEMM
    timing, are host work done once per process, not operations to trace."""
    # exactly what torch._dynamo.assume_constant_result does (it sets this marker and returns fn);
    # importing torch._dynamo here would import triton, and with it seconds of start-up, at package
    # import (tests/test_kernels.py::test_import_is_light; test_compile checks the marker still works)
    fn._dynamo_marked_constant = True
    return fn


@_constant_at_trace
def _ensure_loaded() -> Optional[str]:
    reason = _LOADER.ensure()
    if reason is None:
        _register_fakes_once()
    return reason


def _register_fakes() -> None:
    # shape-only kernels so torch.compile / FakeTensor tracing can see through the operators
    @torch.library.register_fake("fused_objectives::lse_forward")
    def _lse_forward_fake(hidden, weight, bias, target, valid, logit_scale, softcap, chunk_rows, chunk_cols,
                          half_gemm=False, entropy=False, dot=None):
        n = hidden.shape[0]
        return (hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((3, n), dtype=torch.float32),
                hidden.new_empty((n,), dtype=torch.int64), hidden.new_empty((3, n), dtype=torch.float32))

    @torch.library.register_fake("fused_objectives::grad_backward")
    def _grad_backward_fake(hidden, weight, bias, target, state, coef, logit_scale, softcap,
                            need_dx, need_dw, need_db, chunk_rows, chunk_cols, half_gemm=False, dot=None):
        return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dx else None,
                torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None,
                torch.empty_like(bias) if need_db else None)

    @torch.library.register_fake("fused_objectives::chunk_stats")
    def _chunk_stats_fake(z, bias, target, logit_scale, softcap, target_raw=None, entropy=False, dot=None):
        n = z.shape[0]
        return (z.new_empty((n,), dtype=torch.float32), z.new_empty((3, n), dtype=torch.float32),
                z.new_empty((n,), dtype=torch.int64), z.new_empty((3, n), dtype=torch.float32))

    @torch.library.register_fake("fused_objectives::chunk_grad_")
    def _chunk_grad_fake(z, bias, target, state, coef, logit_scale, softcap, target_raw=None, dot=None):
        return None

    @torch.library.register_fake("fused_objectives::target_logits")
    def _target_logits_fake(hidden, weight, target):
        return hidden.new_empty((hidden.shape[0],), dtype=torch.float32)


_FAKES_DONE = False


def _register_fakes_once() -> None:
    global _FAKES_DONE
    if not _FAKES_DONE:
        try:
            _register_fakes()
        except RuntimeError:
            pass  # already registered (module reloaded)
        _FAKES_DONE = True


_HALF_GEMM: Dict[torch.dtype, bool] = {}
_HALF_LOCK = threading.Lock()


def _gemm_times(dtype: torch.dtype, n: int = 64, h: int = 256, v: int = 512, rounds: int = 7) -> Tuple[float, float]:
    """Best times of the three GEMM layouts of a fused step (logits, dX, dW) in ``dtype`` and in
    fp32, on one thread (other processes preempting one of several threads would swamp a
    millisecond timing; the question is which kernels this CPU has), rounds interleaved."""
    g = torch.Generator().manual_seed(0)
    sets = []
    for dt in (dtype, torch.float32):
        x = torch.randn(n, h, generator=g).to(dt)
        w = torch.randn(v, h, generator=g).to(dt)
        d = torch.randn(n, v, generator=g).to(dt)
        sets.append((lambda x=x, w=w: torch.mm(x, w.T), lambda d=d, w=w: torch.mm(d, w),
                     lambda d=d, x=x: torch.mm(d.T, x)))
    best = [[float("inf")] * 3 for _ in sets]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fns in sets:
            for fn in fns:
                fn()  # first call: kernel selection / JIT
        for r in range(rounds):
            for s, fns in enumerate(sets):
                for k, fn in enumerate(fns):
                    t0 = time.perf_counter()
                    fn()
                    best[s][k] = min(best[s][k], time.perf_counter() - t0)
            ratio = sum(best[0]) / sum(best[1])
            if r >= 1 and not 0.5 < ratio < 2.0:
                break  # clear already (e.g. a 10x slower fallback kernel)
    finally:
        torch.set_num_threads(threads)
    return sum(best[0]), sum(best[1])


def _real_tensors():
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # older torch: no fake-mode stack to leave
        return contextlib.nullcontext()
    return unset_fake_temporarily()


@_constant_at_trace
def half_gemm(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bf16 / fp16) inputs run their GEMMs in ``dtype`` rather than fp32 here.

    Measured once per process and dtype (a few milliseconds): half-precision GEMMs must be clearly
    faster (by 20%) than fp32 ones on this CPU, as with native kernels (bf16 on AVX512-BF16 / AMX,
    fp16 on AVX512-FP16); without them PyTorch's fallback can be 10x slower than fp32.
    ``FUSED_OBJECTIVES_CPU_HALF_GEMM=1`` / ``0`` forces the choice.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    forced = os.environ.get("FUSED_OBJECTIVES_CPU_HALF_GEMM", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    got = _HALF_GEMM.get(dtype)
    if got is None:
        with _HALF_LOCK:
            got = _HALF_GEMM.get(dtype)
            if got is None:
                # real tensors even when first reached while tracing (torch.compile's fake tensors)
                with _real_tensors(), torch.autocast("cpu", enabled=False), torch.no_grad():
                    t_half, t_32 = _gemm_times(dtype)
                got = t_half < 0.8 * t_32
                _HALF_GEMM[dtype] = got
    return got


def plan_chunks(n: int, v: int, h: int, x32: bool, w32: bool, budget_bytes: int,
                tile_bytes: int) -> Tuple[int, int]:
    """``(rows, cols)`` of the logits tile for ``n`` tokens, vocabulary ``v`` and hidden size ``h``.

    The kernels' chunk buffers are the fp32 tile ``rows * cols``, an upcast weight chunk and a dW
    slab (``cols * h`` each, only for non-fp32 weights), and a gathered token chunk plus its dX
    (``rows * h`` each); together they stay within ``budget_bytes`` (down to the minimum tile).
    """
    tile = max(4 * MIN_COLS, min(tile_bytes, budget_bytes // 2))
    per_col = 0 if w32 else 2 * 4 * h  # upcast weight rows + dW slab rows
    per_row = 2 * 4 * h  # gathered token rows + their dX
    # aim at >= 8 rows per tile; weight-sized slabs take at most a quarter of the budget; then
    # narrow the columns until at least one row fits
    cols = min(v, MAX_COLS, max(MIN_COLS, tile // (4 * 8)))
    if per_col:
        cols = min(cols, max(MIN_COLS, budget_bytes // 4 // per_col))
    cols = max(1, min(cols, v, max(MIN_COLS, (budget_bytes - per_row) // (4 + per_col))))
    rows = min(tile // (4 * cols), (budget_bytes - cols * per_col) // (4 * cols + per_row))
    return max(1, min(rows, n)), cols


class CPUBackend:
    """Fused C++ kernels for CPU tensors (fp32, bf16, fp16 inputs; GEMMs in the input dtype where
    that is faster, fp32 statistics and epilogue)."""

    name = "cpu"

    def __init__(self):
        self.budget_bytes = int(float(os.environ.get("FUSED_OBJECTIVES_CPU_BUDGET_MB", "128")) * _MB)
        self.tile_bytes = int(float(os.environ.get("FUSED_OBJECTIVES_CPU_TILE_MB", "32")) * _MB)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return (f"backend='cpu' needs CPU tensors, got {device}; use backend='triton' (CUDA) "
                    f"or backend='reference'")
        return _ensure_loaded()

    def _plan(self, hidden, weight) -> Tuple[int, int]:
        n, h = hidden.shape
        return plan_chunks(n, weight.shape[0], h, hidden.dtype == torch.float32, weight.dtype == torch.float32,
                           self.budget_bytes, self.tile_bytes)

    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions, row_stats: bool = False,
                dot: Optional[torch.Tensor] = None):
        """``(logp, state, argmax, rows [3, N])``: rows = (lse, entropy, dotz); the entropy (one more exp
        per logit) only with ``row_stats``, ``dotz = sum_j dot_j z_j`` (one more multiply-add per
        logit) only with ``dot`` (fp32 [V]); zeros otherwise and at invalid tokens."""
        rows, cols = self._plan(hidden, weight)
        return torch.ops.fused_objectives.lse_forward(hidden, weight, bias, target, valid, opts.logit_scale,
                                                      opts.softcap, rows, cols, self._half(hidden, weight),
                                                      bool(row_stats), dot)

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions,
                 needs: Tuple[bool, bool, bool], dot: Optional[torch.Tensor] = None):
        """Gradients of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` with ``coef`` fp32 ``[N]`` (c),
        ``[2, N]`` (c, b) or ``[3, N]`` (c, b, g; with ``dot``).  Tokens whose coefficients are all
        zero are skipped."""
        need_dx, need_dw, need_db = (bool(needs[0]), bool(needs[1]), bool(needs[2]) and bias is not None)
        rows, cols = self._plan(hidden, weight)
        return torch.ops.fused_objectives.grad_backward(hidden, weight, bias, target, state, coef, opts.logit_scale,
                                                        opts.softcap, need_dx, need_dw, need_db, rows, cols,
                                                        self._half(hidden, weight), dot)

    @staticmethod
    def _half(hidden, weight) -> bool:
        return hidden.dtype == weight.dtype and half_gemm(hidden.dtype)

    def forward_with_grad(self, hidden, weight, bias, target, valid, opts: LogitOptions, coef_fn, needs,
                          row_stats: bool = False, dot: Optional[torch.Tensor] = None):
        """Scalar losses: gradients computed in the forward, 3 GEMMs instead of 4 (see chunked.py)."""
        return chunked.forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs,
                                         self.budget_bytes, self._half(hidden, weight), row_stats, dot)


def ensure_built() -> None:
    """Build or load the C++ kernels now (e.g. while setting up an environment); raise if impossible."""
    reason = _LOADER.ensure()
    if reason is not None:
        raise RuntimeError(reason)
    _register_fakes_once()


BACKEND = CPUBackend()
register_backend("cpu", BACKEND)
