"""Ahead-of-time report of every shipped Triton kernel for A100 (sm_80) and H100/H200 (sm_90a), no GPU needed.

Each kernel is compiled the way a real launch compiles it: the JIT's own binder specialises the
arguments of a llama3-8b-shaped launch (N 8192, H 4096, V 128256), so unit strides become constexpr
1 and 16-divisible pointers, sizes and strides carry ``tt.divisibility`` 16; then
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32), options)`` produces the PTX
and the cubin.  From them this script reads, per (kernel, arch, dtype, features, config):

- ``shared_bytes``: Triton's dynamic shared memory per program, against the arch's opt-in limit
  (sm_80 166,912 B; sm_90 232,448 B): above it the launch fails;
- ``registers``, ``spill_bytes`` (spill stores + spill loads), ``stack_bytes``: ``ptxas -v`` on the PTX (the ptxas Triton
  itself uses for that arch, from the wheel's ``triton/backends/nvidia/bin``);
- ``atomics``: every ``atom.``/``red.`` in the PTX with its memory semantics and scope (PTX's
  default when absent is ``relaxed``), and the SASS fences around them (``MEMBAR``, ``CCTL``, from
  ``cuobjdump -sass``);
- tensor-core instructions: PTX ``wgmma.mma_async`` / ``mma.sync`` and SASS ``HGMMA`` / ``HMMA``
  (static counts, i.e. in the code, not executed), plus ``cp.async`` / TMA loads;
- ``verdict``: ``ok``, or the problems (compile error, shared memory over the limit, spills,
  ``acq_rel``/``acquire``/``release``/``sc`` atomics, local-memory traffic).

Usage (from the repository root; TRITON_INTERPRET must be unset):
    python benchmarks/kernel_report.py --json benchmarks/results/kernel_report.json \
        --markdown benchmarks/results/kernel_report.md
    python benchmarks/kernel_report.py --subset smoke --json /tmp/r.json   # the test's subset

Needs: ``triton`` (any CUDA build; compiling for a target needs no GPU and no driver) with its
``ptxas`` and ``cuobjdump`` (shipped in the wheel).  Without cuobjdump the SASS columns are empty.

Adding a kernel is one entry in ``KERNELS``: where it lives, the configs shipped for it, the feature
switches that change its code, and how its launcher calls it (argument list and constexprs).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
# Triton 3.9 warns unless this is set; 1 is its (and the GPU machine's Triton 3.6) default: FMA fusion on
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), what Triton checks at launch.
ARCHS: Dict[str, dict] = {
    "sm_80": dict(capability=80, gpu="A100", shared_limit=166_912),
    "sm_90a": dict(capability=90, gpu="H100/H200", shared_limit=232_448),
}
# The report's launch shape: the llama3-8b head (every size 16-divisible, as in the bench).
SHAPE = dict(N=8192, H=4096, V=128256)
# Memory semantics that put fences around an atomic (PTX ISA: .sem absent means .relaxed).
ORDERED_SEMS = {"acq_rel", "acquire", "release", "sc"}


@dataclass(frozen=True)
class DType:
    name: str           # bf16 | fp16 | fp32-ieee | fp32-tf32
    torch_name: str     # torch dtype attribute
    tf32: bool          # fp32 inputs with TF32 allowed (torch's fp32 matmul precision "tf32")


DTYPES: Dict[str, DType] = {d.name: d for d in (
    DType("bf16", "bfloat16", False),
    DType("fp16", "float16", False),
    DType("fp32-ieee", "float32", False),
    DType("fp32-tf32", "float32", True),
)}


@dataclass(frozen=True)
class Case:
    """One compilation: what a launch at ``SHAPE`` with these inputs would compile."""

    dtype: DType
    features: Dict[str, bool]
    config_name: str
    config: object

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype.torch_name)


class Ptr:
    """Stands in for a tensor argument: the JIT reads only ``dtype`` and ``data_ptr()`` (0: 16-aligned,
    as every allocation of the caching allocator is)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 0


@dataclass(frozen=True)
class KernelEntry:
    """One shipped ``@triton.jit`` kernel.

    ``configs(dtype, arch, features)`` -> {name: config} shipped for that dtype, arch and feature set; ``features``: names of the boolean
    switches that change the code, ``valid(features)`` filters impossible combinations; ``launch(case)``
    -> (positional args, keyword args incl. constexprs, num_warps, num_stages) exactly as the launcher
    passes them at ``SHAPE``.
    """

    name: str
    target: str                      # "module:attribute"
    configs: Callable[[DType, str, Dict[str, bool]], Dict[str, object]]
    features: Tuple[str, ...]
    launch: Callable[[Case], Tuple[list, dict]]
    valid: Callable[[Dict[str, bool]], bool] = lambda f: True
    smoke: Tuple[Dict[str, bool], ...] = ()  # feature sets of the test's subset (default: all off)
    dtypes: Tuple[str, ...] = tuple(DTYPES)  # the dtypes whose code differs

    def function(self):
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)

    def all_features(self) -> Tuple[str, ...]:
        """``features`` plus the optional ones (``OPTIONAL``) whose constexpr this kernel version has."""
        import inspect
        fn = self.function()
        params = inspect.signature(getattr(fn, "fn", fn)).parameters
        return tuple(self.features) + tuple(k for k, c in OPTIONAL.items() if c in params and k not in self.features)


# ------------------------------------------------------------------ the shipped kernels
def _torch():
    import torch
    return torch


def _dot_args(case: Case) -> dict:
    """DOT_FP32 / PRECISION as the fused backend derives them (backends/triton_fused.dot_fp32 on a GPU,
    configs.dot_precision): fp32 tiles stay fp32, IEEE dots unless TF32 is allowed."""
    fp32 = case.dtype.torch_name == "float32"
    return dict(DOT_FP32=fp32, PRECISION=("tf32" if (case.dtype.tf32 or not fp32) else "ieee"))


def _named(cfg, prefix: str) -> Dict[str, object]:
    """{name in kernels/configs.py: config} for the config the launcher's own selector picks (equal
    configs may have several names: the one starting with ``prefix`` first)."""
    from fused_objectives.kernels import configs
    names = sorted((not k.startswith(prefix), k) for k, v in vars(configs).items()
                   if k.isupper() and v == cfg and "INTERPRET" not in k)
    return {names[0][1] if names else repr(cfg): cfg}


def _tile_meta(cfg) -> dict:
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# The launchers' own config selectors (this process does not interpret, so they return GPU configs).
def _capability(arch: str) -> Tuple[int, int]:
    cap = ARCHS[arch]["capability"]
    return (cap // 10, cap % 10)


def _fwd_configs(dtype: DType, arch: str, features: Dict[str, bool]) -> Dict[str, object]:
    from fused_objectives.kernels import configs
    # the entropy variant has configs of its own (configs.ENTROPY_FORWARD_CONFIGS)
    return _named(configs.forward_config(getattr(_torch(), dtype.torch_name), _capability(arch), dtype.tf32,
                                         entropy=bool(features.get("entropy")),
                                         softcap=bool(features.get("softcap")),
                                         dot=bool(features.get("dot"))), "FORWARD")


def _terms(features: Dict[str, bool]) -> int:
    """Coefficient rows of a backward with these features: c; c, b (HAS_B); c, b, g (HAS_DOT)."""
    return 3 if features.get("dot") else 2 if features.get("lse_coef") else 1


def _bwd_configs(dtype: DType, arch: str, features: Dict[str, bool]) -> Dict[str, object]:
    from fused_objectives.kernels import configs
    return _named(configs.backward_config(getattr(_torch(), dtype.torch_name), _capability(arch), dtype.tf32,
                                          terms=_terms(features)), "BACKWARD")


def _rows_configs(dtype: DType, arch: str, _features: Dict[str, bool]) -> Dict[str, object]:
    from fused_objectives.kernels import configs
    return _named(configs.rows_config(), "ROWS")


def _dz_configs(dtype: DType, arch: str, _features: Dict[str, bool]) -> Dict[str, object]:
    from fused_objectives.kernels import configs
    return _named(configs.dz_config(), "DZ")


def _optional(case: Case) -> dict:
    """Constexprs of optional features, passed only where the kernel has them (see OPTIONAL)."""
    return {OPTIONAL[k]: v for k, v in case.features.items() if k in OPTIONAL}


def _transforms(case: Case) -> dict:
    f = case.features
    return dict(HAS_BIAS=f["bias"], HAS_SCALE=f["scale"], HAS_SOFTCAP=f["softcap"])


def _lse_fwd_launch(case: Case):
    """kernels/forward.py fused_forward."""
    torch = _torch()
    from fused_objectives.kernels import configs
    N, H, V = SHAPE["N"], SHAPE["H"], SHAPE["V"]
    cfg, x = case.config, case.torch_dtype
    n_blocks = -(-N // cfg.block_n)
    v_blocks = -(-V // cfg.block_v)
    splits = max(1, min(v_blocks, -(-configs.TARGET_PROGRAMS // n_blocks)))
    v_per_split = -(-v_blocks // splits) * cfg.block_v
    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    args = dict(x_ptr=Ptr(x), w_ptr=Ptr(x), b_ptr=Ptr(x), tgt_ptr=Ptr(i64), row_idx_ptr=Ptr(i64),
                n_active_ptr=Ptr(i32), m_ptr=Ptr(f32), rest_ptr=Ptr(f32), amax_ptr=Ptr(i64), tlogit_ptr=Ptr(f32),
                sent_ptr=Ptr(f32), dot_ptr=Ptr(f32), sdot_ptr=Ptr(f32), V=V, H=H, v_per_split=v_per_split, stride_xn=H, stride_xh=1, stride_wv=H,
                stride_wh=1, stride_part=N, logit_scale=1.0, softcap=1.0)
    return args, dict(**_transforms(case), **_dot_args(case), **_optional(case), **_tile_meta(cfg))


def _grad_bwd_launch(case: Case):
    """kernels/backward.py fused_backward, first dW slab (v_start 0, v_end = slab rows or V)."""
    torch = _torch()
    from fused_objectives.kernels import configs
    N, H, V = SHAPE["N"], SHAPE["H"], SHAPE["V"]
    cfg, x, f = case.config, case.torch_dtype, case.features
    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    slab = V if x == f32 else min(V, max(cfg.block_v, configs.DW_SLAB_BYTES // (4 * H) // cfg.block_v * cfg.block_v))
    args = dict(x_ptr=Ptr(x), w_ptr=Ptr(x), b_ptr=Ptr(x), tgt_ptr=Ptr(i64), state_ptr=Ptr(f32), omp_ptr=Ptr(f32),
                coef_ptr=Ptr(f32), dot_ptr=Ptr(f32), row_idx_ptr=Ptr(i64), n_active_ptr=Ptr(i32), dx_ptr=Ptr(f32),
                dw_ptr=Ptr(f32),
                db_ptr=Ptr(f32), N=N, V=V, H=H, v_start=0, v_end=slab, stride_xn=H, stride_xh=1, stride_wv=H,
                stride_wh=1, stride_dxn=H, stride_dwv=H, logit_scale=1.0, softcap=1.0)
    return args, dict(**_transforms(case), **_dot_args(case), COMPUTE_DX=f["dx"], COMPUTE_DW=f["dw"],
                      COMPUTE_DB=f["db"], **_optional(case), **_tile_meta(cfg))


def _chunk_rows(dtype) -> int:
    """Rows of the chunked strategy's [rows, V] buffer (backends/triton_chunked.chunk_rows)."""
    from fused_objectives.kernels import configs
    rows = configs.CHUNK_BUDGET_BYTES // (SHAPE["V"] * _torch().empty((), dtype=dtype).element_size())
    return rows // 64 * 64 if rows >= 64 else rows


def _logits_dtype(case: Case):
    """The chunked strategy's logits buffer: the input dtype, or fp32 for half inputs when
    ``fp32_logits`` (triton_chunked.LOGITS_FP32; fp16 scalar losses always)."""
    return _torch().float32 if case.features.get("fp32_logits") else case.torch_dtype


def _row_stats_launch(case: Case):
    """kernels/rows.py row_stats on one [rows, V] chunk of the scalar path."""
    torch = _torch()
    V, cfg, x, z = SHAPE["V"], case.config, case.torch_dtype, _logits_dtype(case)
    f32, i64 = torch.float32, torch.int64
    args = dict(z_ptr=Ptr(z), b_ptr=Ptr(x), tgt_ptr=Ptr(i64), dot_ptr=Ptr(f32), m_ptr=Ptr(f32), rest_ptr=Ptr(f32),
                amax_ptr=Ptr(i64), zt_ptr=Ptr(f32), sent_ptr=Ptr(f32), sdot_ptr=Ptr(f32), M=_chunk_rows(z), C=V, stride_zm=V, logit_scale=1.0, softcap=1.0)
    return args, dict(**_transforms(case), **_optional(case), BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v,
                      num_warps=cfg.num_warps)


def _dz_launch(case: Case):
    """kernels/rows.py softmax_grad_ on one [rows, V] chunk (col0 0), output in the input dtype (in place
    unless the logits are fp32).  The per-token backward's slabs ([n, 12288] at N 8192, col0 a multiple
    of 12288, last slab 5376 wide) give the same specialisation: every size 16-divisible."""
    torch = _torch()
    V, cfg, x, z = SHAPE["V"], case.config, case.torch_dtype, _logits_dtype(case)
    f32, i64 = torch.float32, torch.int64
    args = dict(z_ptr=Ptr(z), dz_ptr=Ptr(x), b_ptr=Ptr(x), tgt_ptr=Ptr(i64), m_ptr=Ptr(f32), log_norm_ptr=Ptr(f32),
                omp_ptr=Ptr(f32), coef_ptr=Ptr(f32), dot_ptr=Ptr(f32), M=_chunk_rows(z), C=V, col0=0, stride_zm=V,
                stride_dzm=V, stride_coef=_chunk_rows(z), logit_scale=1.0, softcap=1.0)
    return args, dict(**_transforms(case), **_optional(case), BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)


def _grad_valid(f: Dict[str, bool]) -> bool:
    # something to compute; a bias gradient only with a bias
    return (f["dx"] or f["dw"] or f["db"]) and (f["bias"] or not f["db"])


TRANSFORMS = ("bias", "scale", "softcap")
# Features some kernel versions have: feature -> constexpr (compiled when the kernel has that parameter).
# lse_coef: the gradient's b p term (z-loss, label smoothing); dot: the forward's sum_j u_j z_j and the
# gradient's g u term (label smoothing), which comes with lse_coef (coef [3, N] = c, b, g).
OPTIONAL = {"entropy": "ENTROPY", "lse_coef": "HAS_B", "dot": "HAS_DOT"}
GRAD_SWITCHES = ("dx", "dw", "db")  # the backward's outputs (subset "full" samples their combinations)
TERM_SWITCHES = ("lse_coef", "dot")  # the coefficient terms (subset "full" samples them, see feature_sets)
ROW_FEATURES = TRANSFORMS + ("fp32_logits",)
# Row kernels have no tl.dot: the TF32 setting cannot change them, one fp32 entry covers both.
NO_DOT_DTYPES = ("bf16", "fp16", "fp32-ieee")

KERNELS: List[KernelEntry] = [
    KernelEntry("lse_fwd_kernel", "fused_objectives.kernels.forward:lse_fwd_kernel", _fwd_configs,
                TRANSFORMS, _lse_fwd_launch, smoke=({}, dict(entropy=True), dict(dot=True))),
    KernelEntry("grad_bwd_kernel", "fused_objectives.kernels.backward:grad_bwd_kernel", _bwd_configs,
                TRANSFORMS + ("dx", "dw", "db"), _grad_bwd_launch, _grad_valid,
                smoke=(dict(dx=True, dw=True), dict(dx=True, dw=True, lse_coef=True, dot=True))),
    KernelEntry("row_stats_kernel", "fused_objectives.kernels.rows:row_stats_kernel", _rows_configs,
                ROW_FEATURES, _row_stats_launch, dtypes=NO_DOT_DTYPES,
                smoke=({}, dict(fp32_logits=True), dict(entropy=True), dict(dot=True))),
    KernelEntry("dz_kernel", "fused_objectives.kernels.rows:dz_kernel", _dz_configs,
                ROW_FEATURES, _dz_launch, dtypes=NO_DOT_DTYPES,
                smoke=({}, dict(fp32_logits=True), dict(lse_coef=True, dot=True))),
]


# ------------------------------------------------------------------ compile and inspect
def _tool(name: str) -> Optional[str]:
    """A CUDA binary shipped in the Triton wheel, else on PATH."""
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    from shutil import which
    return which(name)


def _ptxas_for(capability: int) -> str:
    """The ptxas Triton uses for this arch (Triton >= 3.5 uses ptxas-blackwell from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(capability).path
    except (ImportError, AttributeError, TypeError):
        pass
    path = _tool("ptxas")
    if path is None:
        raise RuntimeError("ptxas not found: it ships in Triton's CUDA wheel (triton/backends/nvidia/bin/ptxas); "
                           "a CUDA toolkit's ptxas on PATH works too")
    return path


_PTX_MEM = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:atom|red)\.[\w.:]+)", re.M)
_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_:]+)*)", re.M)
_SEMS = ("relaxed", "acquire", "release", "acq_rel", "sc", "volatile")
_SCOPES = ("cta", "cluster", "gpu", "sys")
_OPS = ("add", "min", "max", "inc", "dec", "cas", "exch", "and", "or", "xor")


def ptx_atomics(ptx: str) -> List[dict]:
    """Every atomic / reduction instruction of the PTX, grouped: op, type, semantics, scope, count."""
    groups: Dict[tuple, int] = {}
    for m in _PTX_MEM.finditer(ptx):
        parts = m.group(1).split(".")
        kind = parts[0]
        sem = next((p for p in parts if p in _SEMS), None)
        scope = next((p for p in parts if p in _SCOPES), "gpu")
        op = next((p for p in parts if p in _OPS), "?")
        typ = parts[-1]
        key = (kind, op, typ, sem or "relaxed", sem is None, scope)
        groups[key] = groups.get(key, 0) + 1
    return [dict(instr=k[0], op=k[1], type=k[2], sem=k[3], sem_default=k[4], scope=k[5], count=n)
            for k, n in sorted(groups.items())]


def ptx_counts(ptx: str) -> Dict[str, int]:
    def count(pattern: str) -> int:
        return len(re.findall(pattern, ptx, re.M))
    return {
        "wgmma": count(r"^\s*(?:@!?%p\d+\s+)?wgmma\.mma_async"),
        "mma_sync": count(r"^\s*(?:@!?%p\d+\s+)?mma\.sync"),
        "cp_async": count(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg)\b"),
        "tma": count(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk\.tensor"),
        "fence": count(r"^\s*(?:@!?%p\d+\s+)?(?:fence|membar)\.(?!proxy)"),
    }


def sass_counts(cubin: bytes) -> Optional[Dict[str, int]]:
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        return None
    ops = [m.group(1) for m in _SASS_OP.finditer(out.stdout)]
    base = [o.split(".")[0] for o in ops]

    def n(*names):
        return sum(1 for b in base if b in names)
    return {
        "instructions": len(ops),
        "HGMMA": n("HGMMA"), "HMMA": n("HMMA"),
        "ATOM": n("ATOM", "ATOMG", "ATOMS"), "RED": n("RED", "REDG"),
        "MEMBAR": n("MEMBAR"), "CCTL": n("CCTL"),
        # GPU- or system-wide fences (what an acq_rel atomic brings); MEMBAR.ALL.CTA orders shared memory only
        "MEMBAR_GPU": sum(1 for o in ops if o.startswith("MEMBAR") and (".GPU" in o or ".SYS" in o)),
        "LDGSTS": n("LDGSTS"), "UTMALDG": n("UTMALDG"),
        "LDL": n("LDL"), "STL": n("STL"),
    }


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: str, capability: int) -> dict:
    """``ptxas -v`` on the PTX with Triton's own register-allocation flag."""
    ptxas = _ptxas_for(capability)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0 and "regAllocOptLevel" in out.stderr:  # older ptxas
            cmd.remove("--regAllocOptLevel=2")
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({out.returncode}): {log.strip()[-500:]}")
    res = {"ptxas": Path(ptxas).name}
    for k, rx in _PTXAS_RE.items():
        m = rx.search(log)
        res[k] = int(m.group(1)) if m else None
    return res


def _config_dict(cfg) -> dict:
    return asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))


def compile_case(entry: KernelEntry, arch: str, case: Case) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    info = ARCHS[arch]
    rec = dict(kernel=entry.name, arch=arch, gpu=info["gpu"], dtype=case.dtype.name,
               features=dict(case.features), config_name=case.config_name, config=_config_dict(case.config),
               shared_limit=info["shared_limit"], shared_bytes=None, registers=None, spill_bytes=None,
               stack_bytes=None, compiled=False, error=None, atomics=[], ptx=None, sass=None, compile_s=None)
    t0 = time.monotonic()
    try:
        fn = entry.function()
        if not hasattr(fn, "params") or not hasattr(fn, "_pack_args"):
            raise RuntimeError(f"{entry.target} is not a compilable JITFunction ({type(fn).__name__}); "
                               "unset TRITON_INTERPRET")
        target = GPUTarget("cuda", info["capability"], 32)
        backend = make_backend(target)
        named, kw = entry.launch(case)
        names = [p.name for p in fn.params]
        missing = [n for n in names if n not in named and n not in kw]
        if missing:
            raise RuntimeError(f"benchmarks/kernel_report.py's entry for {entry.name} is out of date: the kernel "
                               f"has parameters {missing} the entry gives no value for")
        args = [named[n] for n in names if n not in kw]
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
        # Triton prints ptxas failures itself (with the whole PTX): keep that out of the report's output
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        ptx = compiled.asm["ptx"]
        rec.update(shared_bytes=int(compiled.metadata.shared), compiled=True,
                   atomics=ptx_atomics(ptx), ptx=ptx_counts(ptx), sass=sass_counts(compiled.asm["cubin"]))
        usage = ptxas_usage(ptx, arch, info["capability"])
        rec.update(registers=usage["registers"], stack_bytes=usage["stack_bytes"], ptxas=usage["ptxas"],
                   spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"],
                   spill_bytes=(usage["spill_stores"] or 0) + (usage["spill_loads"] or 0))
    except Exception as exc:  # a failing compile is a finding, not a crash of the report
        msg = f"{type(exc).__name__}: {exc}".strip()
        rec["error"] = msg if len(msg) < 2000 else msg[:1000] + " ... " + msg[-900:]
    rec["compile_s"] = round(time.monotonic() - t0, 2)
    rec["verdict"] = verdict(rec)
    return rec


def verdict(rec: dict) -> str:
    """``ok`` or the problems, separated by '; '."""
    if not rec["compiled"]:
        return "COMPILE ERROR"
    problems = []
    if rec["shared_bytes"] > rec["shared_limit"]:
        problems.append(f"shared {rec['shared_bytes']} B > {rec['shared_limit']} B (launch fails)")
    if rec["spill_bytes"]:
        problems.append(f"spills {rec['spill_bytes']} B")
    ordered = sorted({a["sem"] for a in rec["atomics"] if a["sem"] in ORDERED_SEMS})
    if ordered:
        problems.append("ordered atomics (" + ", ".join(ordered) + ")")
    if rec["sass"] and (rec["sass"]["LDL"] or rec["sass"]["STL"]):
        problems.append("local memory (LDL/STL)")
    return "; ".join(problems) if problems else "ok"


# ------------------------------------------------------------------ the sweep
def _terms_valid(f: Dict[str, bool]) -> bool:
    """A kernel with both switches gets the g term only with the b term (coef [3, N] holds both)."""
    return not ("lse_coef" in f and f.get("dot") and not f["lse_coef"])


def feature_sets(entry: KernelEntry, subset: str) -> List[Dict[str, bool]]:
    """The feature combinations compiled for ``subset``:

    - ``all``: every combination (the cross product);
    - ``full``: every combination of the other switches (logit transforms, fp32 logits, entropy) with
      the gradient switches (dx, dw, db) all on (as many as valid), plus every combination of the
      gradient switches with the others all off and all on (backward: 16 instead of 40 per dtype and
      arch); the coefficient terms (``TERM_SWITCHES``: lse_coef, dot) on only with the other switches
      all off or all on and the gradient switches at their most;
    - ``smoke``: the entry's ``smoke`` sets (default: everything off), the test's subset.
    """
    names = entry.all_features()
    if subset == "smoke":
        # optional features the kernel lacks drop out of the smoke sets
        sets = [{**{k: False for k in names}, **{k: v for k, v in s.items() if k in names}}
                for s in (entry.smoke or ({},))]
        return [f for i, f in enumerate(sets) if f not in sets[:i]]
    combos = [dict(zip(names, bits)) for bits in itertools.product((False, True), repeat=len(names))]
    combos = [f for f in combos if entry.valid(f) and _terms_valid(f)]
    if subset == "all":
        return combos
    # the coefficient terms (lse_coef, dot) only with the other switches all off or all on, and the
    # gradient switches at their most (what the terms change is the epilogue's register pressure)
    terms = [k for k in names if k in TERM_SWITCHES]
    if terms:
        rest = [k for k in names if k not in TERM_SWITCHES and k not in GRAD_SWITCHES]
        base = [f for f in combos if not any(f[k] for k in terms)]
        extra = [f for f in combos if any(f[k] for k in terms) and
                 (all(f[k] for k in rest) or not any(f[k] for k in rest))]
        names = [k for k in names if k not in TERM_SWITCHES]
        combos = base
    else:
        extra = []
    grads = [k for k in names if k in GRAD_SWITCHES]
    if not grads:
        return combos + extra
    keep = []
    for f in combos:
        transforms = [f[k] for k in names if k not in GRAD_SWITCHES]
        most = max(sum(g[k] for k in grads) for g in combos
                   if all(g[k] == f[k] for k in names if k not in GRAD_SWITCHES))
        if sum(f[k] for k in grads) == most or all(transforms) or not any(transforms):
            keep.append(f)
    for f in extra:
        most = max(sum(g[k] for k in grads) for g in extra
                   if all(g[k] == f[k] for k in f if k not in GRAD_SWITCHES))
        if sum(f[k] for k in grads) == most:
            keep.append(f)
    return keep


def cases(entry: KernelEntry, dtypes: Sequence[str], subset: str, archs: Sequence[str]) -> Iterator[Tuple[str, Case]]:
    """(arch, case) pairs: per dtype, per feature set, the config(s) shipped for each arch."""
    sets = feature_sets(entry, subset)
    for dname in dtypes:
        if dname not in entry.dtypes:
            continue
        dtype = DTYPES[dname]
        for feats in sets:
            # fp32 logits are the input dtype's own for fp32 inputs: no separate variant
            if not entry.valid(feats) or (feats.get("fp32_logits") and dtype.torch_name == "float32"):
                continue
            for arch in archs:
                for cname, cfg in entry.configs(dtype, arch, feats).items():
                    yield arch, Case(dtype, feats, cname, cfg)


def environment() -> dict:
    import triton
    env = dict(date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), python=platform.python_version(),
               triton=triton.__version__, shape=SHAPE, archs=ARCHS)
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        pass
    for cap in (80, 90):
        try:
            out = subprocess.run([_ptxas_for(cap), "--version"], capture_output=True, text=True, timeout=60)
            env[f"ptxas_sm{cap}"] = out.stdout.strip().splitlines()[-1]
        except (OSError, RuntimeError, subprocess.SubprocessError, IndexError) as exc:
            env[f"ptxas_sm{cap}"] = f"unavailable: {exc}"
    env["cuobjdump"] = _tool("cuobjdump")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        env["git_dirty_kernels"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "fused_objectives/kernels"], cwd=ROOT, capture_output=True,
            text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    # what was compiled, exactly: the kernel sources' hashes (the tree may differ from the commit)
    env["sources"] = {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
                      for f in sorted((ROOT / "fused_objectives" / "kernels").glob("*.py"))}
    return env


def run(kernels: Sequence[str], archs: Sequence[str], dtypes: Sequence[str], subset: str,
        progress: Callable[[str], None] = lambda s: None,
        checkpoint: Callable[[List[dict]], None] = lambda recs: None) -> List[dict]:
    records = []
    for entry in KERNELS:
        if kernels and entry.name not in kernels:
            continue
        for arch, case in cases(entry, dtypes, subset, archs):
            rec = compile_case(entry, arch, case)
            progress(f"{entry.name:<24} {arch:<6} {case.dtype.name:<9} {_feat_str(case.features):<28} "
                     f"{case.config_name:<18} {rec['compile_s']:5.1f}s  {rec['verdict']}")
            records.append(rec)
            checkpoint(records)
    return records


# ------------------------------------------------------------------ markdown
def _feat_str(features: Dict[str, bool]) -> str:
    on = [k for k, v in features.items() if v]
    return "+".join(on) if on else "-"


def _atom_str(atomics: List[dict]) -> str:
    if not atomics:
        return "none"
    return ", ".join(f"{a['count']}x {a['instr']}.{a['op']}.{a['type']} {a['sem']}"
                     f"{' (default)' if a['sem_default'] else ''}" for a in atomics)


def _cfg_str(cfg: dict) -> str:
    keys = ("block_n", "block_v", "block_h", "block_m", "block_k", "num_warps", "num_stages")
    short = {"block_n": "n", "block_v": "v", "block_h": "h", "block_m": "m", "block_k": "k",
             "num_warps": "w", "num_stages": "s"}
    parts = [f"{short[k]}{cfg[k]}" for k in keys if k in cfg]
    rest = [f"{k}={v}" for k, v in cfg.items() if k not in keys]
    return " ".join(parts + rest)


def markdown(records: List[dict], env: dict) -> str:
    bad = [r for r in records if r["verdict"] != "ok"]
    kernels = sorted({r["kernel"] for r in records})
    lines = [
        "# Triton kernel report (ahead-of-time compile, no GPU)",
        "",
        f"Generated by `benchmarks/kernel_report.py` on {env['date_utc']}: Triton {env['triton']}, "
        f"commit `{str(env.get('git_commit'))[:10]}`"
        f"{' with uncommitted kernel changes (source hashes in the JSON)' if env.get('git_dirty_kernels') else ''}; "
        f"ptxas sm_80: {env.get('ptxas_sm80')}; "
        f"ptxas sm_90a: {env.get('ptxas_sm90')}.",
        f"Launch specialisation of a llama3-8b head (N {SHAPE['N']}, H {SHAPE['H']}, V {SHAPE['V']}): unit "
        "strides constexpr 1, 16-divisible pointers/sizes/strides. These are compiler facts, not timings.",
        "Shared limit: sm_80 (A100) 166,912 B, sm_90a (H100/H200) 232,448 B. Registers and spills from "
        "`ptxas -v`; atomics from the PTX (`sem` as written, `relaxed` when absent); SASS counts from "
        "`cuobjdump -sass` (static instruction counts).",
        "",
        f"Feature subset `{env.get('subset', 'full')}` (see `--subset`); row kernels have no `tl.dot`, so one "
        "fp32 entry (`fp32-ieee`) covers both fp32 settings.",
        "",
        f"**{len(records)} compilations of {len(kernels)} kernels ({', '.join(kernels)}); "
        f"{len(records) - len(bad)} ok, {len(bad)} with problems.**",
        "",
    ]
    if bad:
        lines += ["## Problems", "", "| kernel | arch | dtype | features | config | verdict |", "|---|---|---|---|---|---|"]
        for r in bad:
            v = r["verdict"] if r["compiled"] else f"COMPILE ERROR: {str(r['error'])[:160]}"
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {_feat_str(r['features'])} | "
                         f"{r['config_name']} | {v.replace('|', '/')} |")
        lines.append("")
    lines += ["## All compilations", "",
              "| kernel | arch | dtype | features | config | shared B (limit) | regs | spill B | "
              "wgmma / mma (PTX) | HGMMA / HMMA (SASS) | atomics (PTX) | MEMBAR gpu / all, CCTL (SASS) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r["compiled"]:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {_feat_str(r['features'])} | "
                         f"{r['config_name']} {_cfg_str(r['config'])} | - | - | - | - | - | - | - | COMPILE ERROR |")
            continue
        s = r["sass"] or {}
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {_feat_str(r['features'])} | "
            f"{r['config_name']} {_cfg_str(r['config'])} | {r['shared_bytes']:,} ({r['shared_limit']:,}) | "
            f"{r['registers']} | {r['spill_bytes']} | {r['ptx']['wgmma']} / {r['ptx']['mma_sync']} | "
            f"{s.get('HGMMA', '?')} / {s.get('HMMA', '?')} | {_atom_str(r['atomics'])} | "
            f"{s.get('MEMBAR_GPU', '?')} / {s.get('MEMBAR', '?')}, {s.get('CCTL', '?')} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--json", metavar="FILE", help="write {environment, records} JSON here")
    p.add_argument("--markdown", metavar="FILE", help="write the readable summary here")
    p.add_argument("--kernel", nargs="+", default=[], help=f"only these ({', '.join(k.name for k in KERNELS)})")
    p.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--subset", choices=["full", "all", "smoke"], default="full",
                   help="full (default): every transform combination, every gradient-switch combination "
                        "at transforms all off / all on; all: the whole cross product; smoke: each kernel's "
                        "default features (the test's subset)")
    p.add_argument("--update", action="store_true",
                   help="with --json: keep that file's records of the kernels not compiled now (e.g. --kernel dz_kernel "
                        "after a change to it) and replace the others")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    unknown = set(args.kernel) - {k.name for k in KERNELS}
    if unknown:
        p.error(f"unknown kernel(s) {sorted(unknown)}; known: {[k.name for k in KERNELS]}")
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        p.error(f"needs Triton with its NVIDIA backend (pip install triton): {exc}")
    env = environment()
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    def write_json(records):
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"environment": env, "records": records}, f, indent=1)
                f.write("\n")
    # the JSON is rewritten after every compilation: an interrupted sweep keeps what it compiled
    env["subset"] = args.subset
    kept: List[dict] = []
    if args.update and args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        redo = set(args.kernel) or {k.name for k in KERNELS}
        kept = [r for r in old["records"] if r["kernel"] not in redo]
        env["updated_kernels"] = sorted(redo)
        env["kept_from"] = {k: old["environment"].get(k) for k in ("date_utc", "git_commit", "sources", "triton")}
    records = kept + run(args.kernel, args.arch, args.dtype, args.subset, say, lambda recs: write_json(kept + recs))
    order = {k.name: i for i, k in enumerate(KERNELS)}
    records.sort(key=lambda r: order.get(r["kernel"], len(order)))
    write_json(records)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(records, env))
    bad = [r for r in records if r["verdict"] != "ok"]
    print(f"{len(records)} compilations, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
