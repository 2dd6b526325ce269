"""Block sizes, launch parameters and memory budgets of every Triton kernel, all in one place.

No GPU has measured these yet.  The fused tile kernels' configs are chosen per input kind (bf16/fp16,
fp32 with TF32 dots, fp32 with IEEE dots) and per architecture (sm_80 family, sm_90 and newer) so
that each compiles within the opt-in shared memory (sm_80 166,912 B, sm_90 232,448 B) *without
register spills*, for every feature switch at once (bias, scale, soft-cap, dX, dW, db), with both
Triton 3.6 (the GPU machine's) and 3.9: checked by compiling ahead of time for ``GPUTarget("cuda",
80 | 90, 32)`` on CPU with the llama3-8b launch specialisation, ``compiled.metadata.shared`` and
``ptxas -v`` (benchmarks/kernel_report.py does it for every kernel).  What the sweep found: the old
one-size 128x128x64 backward spilled on sm_80 (Triton 3.9: 968 B with every feature) and on sm_90a
once the accurate soft-cap tanh was in (144 B); a 128x64 tile does not.  fp32 tiles hold twice the
bytes: TF32 backward 128x128x32 with 2 stages spilled and needed 180,224 B of shared memory on
sm_80 under Triton 3.6 (launch failure), 64x128x32 fits (114,688-131,072 B) without spills.  IEEE
fp32 dots run on FMA units and need far smaller tiles.  Other sm_8x GPUs (sm_86 / sm_89: 101,376 B
of shared memory) get the sm_80 configs, unchecked: the fp32 TF32 backward's may not fit there.
The row kernels (kernels/rows.py) use <= 4 KB of shared memory and 61-80 registers without spills
(the dz kernel needed 120-148 registers with 4 warps, hence 8).  Under ``TRITON_INTERPRET=1`` (CPU
tests) small tiles keep the interpreter fast while still exercising masking (V and H not multiples
of the block).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class RowConfig:
    """Row kernels (kernels/rows.py): ``[block_m, block_v]`` tiles of a logits buffer."""

    block_m: int
    block_v: int
    num_warps: int = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Fused tile kernels (kernels/forward.py, kernels/backward.py): (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages).
# Shared memory per program in brackets: sm_80 / sm_90a, Triton 3.9 (3.6 where it differs).
FORWARD_HALF = KernelConfig(128, 128, 64, 8, 3)        # bf16/fp16, both archs (65,536 / 98,304 B)
FORWARD_TF32_SM80 = KernelConfig(128, 128, 32, 8, 3)   # (65,536 B)
FORWARD_TF32_SM90 = KernelConfig(128, 64, 32, 8, 3)    # (73,728 B); 128x128x32 spilled 64 B
FORWARD_IEEE = KernelConfig(64, 128, 32, 8, 3)         # both archs (49,152 B)
BACKWARD_HALF_SM80 = KernelConfig(128, 64, 32, 8, 3)   # (57,344 B)
BACKWARD_HALF_SM90 = KernelConfig(128, 64, 64, 8, 3)   # (122,880 B)
BACKWARD_TF32 = KernelConfig(64, 128, 32, 8, 3)        # both archs (114,688 (131,072) / 155,648 B)
BACKWARD_IEEE_SM80 = KernelConfig(32, 64, 16, 4, 2)    # 64x64x16 / 8 warps spilled 8 B (3.9), 24-40 B (3.6); 64x32x16 / 4 warps 8 B
BACKWARD_IEEE_SM90 = KernelConfig(64, 32, 16, 4, 2)    # (14,336 B)
FUSED_CONFIGS = {
    ("forward", "half", 80): FORWARD_HALF, ("forward", "half", 90): FORWARD_HALF,
    ("forward", "tf32", 80): FORWARD_TF32_SM80, ("forward", "tf32", 90): FORWARD_TF32_SM90,
    ("forward", "ieee", 80): FORWARD_IEEE, ("forward", "ieee", 90): FORWARD_IEEE,
    ("backward", "half", 80): BACKWARD_HALF_SM80, ("backward", "half", 90): BACKWARD_HALF_SM90,
    ("backward", "tf32", 80): BACKWARD_TF32, ("backward", "tf32", 90): BACKWARD_TF32,
    ("backward", "ieee", 80): BACKWARD_IEEE_SM80, ("backward", "ieee", 90): BACKWARD_IEEE_SM90,
}
# The forward with the entropy accumulator (ENTROPY, only for return_stats=True) on 64-row tiles where
# the 128-row ones spilled (benchmarks/kernel_report.py, Triton 3.9.0, 255 registers: 712 B on sm_80
# bf16 and TF32, 24 B on sm_90a bf16); with 64 rows: no spill, 184-190 registers on both archs.
FORWARD_ENTROPY_HALF = KernelConfig(64, 128, 64, 8, 3)
FORWARD_ENTROPY_TF32_SM80 = KernelConfig(64, 128, 32, 8, 3)
ENTROPY_FORWARD_CONFIGS = {
    ("half", 80): FORWARD_ENTROPY_HALF, ("half", 90): FORWARD_ENTROPY_HALF, ("tf32", 80): FORWARD_ENTROPY_TF32_SM80,
}
# The forward with the dot accumulator (HAS_DOT, label smoothing) takes the same 64-row tiles: with
# 128 rows it spilled (Triton 3.9, bf16, 255 registers: 560 B on sm_80, 104 B on sm_90a; 24 / 144 B with
# bias and scale); with 64 rows 170-194 registers, no spill.
# The soft-capped half-precision forward on sm_90a: 128-row tiles spilled 16 B (255 registers,
# Triton 3.9); the 64-row entropy tile does not.
SOFTCAP_FORWARD_CONFIGS = {("half", 90): FORWARD_ENTROPY_HALF}
# The backward with the lse / dot coefficients (HAS_B, HAS_DOT: z-loss, label smoothing), where the
# classic config spills with them: IEEE fp32 on sm_90a with every feature spilled 8 B with 2 stages
# (Triton 3.9, 168 registers); 8 warps and 2 stages spilled 16 B under Triton 3.6 (dX+dW with b only);
# 1 stage (the classic tile and warps): 164-166 registers on both versions for every terms combination.
BACKWARD_IEEE_TERMS_SM90 = KernelConfig(64, 32, 16, 4, 1)  # (12,288 B)
TERMS_BACKWARD_CONFIGS = {("ieee", 90): BACKWARD_IEEE_TERMS_SM90}
INTERPRET = KernelConfig(block_n=16, block_v=32, block_h=16, num_warps=1, num_stages=1)

# Row kernels: one logits row (or a few under the interpreter) per program, streaming the vocabulary.
ROWS_DEFAULT = RowConfig(block_m=1, block_v=2048, num_warps=8)   # row statistics: a whole row per program
DZ_DEFAULT = RowConfig(block_m=4, block_v=1024, num_warps=8)     # elementwise dz: 2-D grid, 16 values a thread
ROWS_INTERPRET = RowConfig(block_m=8, block_v=64, num_warps=1)

# Enough vocabulary splits in the fused forward that the grid fills the GPU even when N is small.
TARGET_PROGRAMS = 4 * 132

# The fused backward accumulates dW in fp32 one vocabulary slab at a time, bounding that buffer to
# DW_SLAB_BYTES (it is written straight into the gradient when the weight is fp32).
DW_SLAB_BYTES = 128 * 1024 * 1024

# The chunked strategy (backends/triton_chunked.py): bytes of its [rows, V] (or [n, V_slab])
# logits/gradient buffer.  At the llama3-8b head (V 128256, bf16) that is 768 rows; the derivation
# against the 2% memory goal is in that module's docstring.
CHUNK_BUDGET_BYTES = 192 * 1024 * 1024


def _is_fp32(dtype) -> bool:
    import torch

    return dtype == torch.float32


def _kind(dtype, tf32: Optional[bool]) -> str:
    if not _is_fp32(dtype):
        return "half"
    return "tf32" if (fp32_matmul_allows_tf32() if tf32 is None else tf32) else "ieee"


def _arch(capability: Optional[Tuple[int, int]]) -> int:
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    return 90 if tuple(capability) >= (9, 0) else 80


def capability_of(device) -> Optional[Tuple[int, int]]:
    """The compute capability of a CUDA ``device`` (None for any other device)."""
    import torch

    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def forward_config(dtype=None, capability: Optional[Tuple[int, int]] = None,
                   tf32: Optional[bool] = None, entropy: bool = False, softcap: bool = False,
                   dot: bool = False) -> KernelConfig:
    """The fused forward's config for inputs of ``dtype`` on a GPU of ``capability`` (default: the
    current device's) with TF32 dots or not (default: PyTorch's fp32 matmul setting); ``entropy``:
    the variant that also accumulates the rows' entropy (``ENTROPY_FORWARD_CONFIGS``); ``dot``: the
    one that accumulates ``sum_j u_j z_j`` (the same 64-row ``ENTROPY_FORWARD_CONFIGS``); ``softcap``: the soft-capped
    variant (``SOFTCAP_FORWARD_CONFIGS``)."""
    if interpreting():
        return INTERPRET
    kind, arch = _kind(dtype, tf32), _arch(capability)
    if (entropy or dot) and (kind, arch) in ENTROPY_FORWARD_CONFIGS:
        return ENTROPY_FORWARD_CONFIGS[(kind, arch)]
    if softcap and (kind, arch) in SOFTCAP_FORWARD_CONFIGS:
        return SOFTCAP_FORWARD_CONFIGS[(kind, arch)]
    return FUSED_CONFIGS[("forward", kind, arch)]


def backward_config(dtype=None, capability: Optional[Tuple[int, int]] = None,
                    tf32: Optional[bool] = None, terms: int = 1) -> KernelConfig:
    """The fused backward's config (see :func:`forward_config`); ``terms``: coefficient rows (1: c,
    2: c and b, 3: c, b and g with the dot vector), see ``TERMS_BACKWARD_CONFIGS``."""
    if interpreting():
        return INTERPRET
    kind, arch = _kind(dtype, tf32), _arch(capability)
    if terms > 1 and (kind, arch) in TERMS_BACKWARD_CONFIGS:
        return TERMS_BACKWARD_CONFIGS[(kind, arch)]
    return FUSED_CONFIGS[("backward", kind, arch)]


def rows_config() -> RowConfig:
    return ROWS_INTERPRET if interpreting() else ROWS_DEFAULT


def dz_config() -> RowConfig:
    return ROWS_INTERPRET if interpreting() else DZ_DEFAULT


def fp32_matmul_allows_tf32() -> bool:
    """Whether PyTorch's own fp32 CUDA matmuls may use TF32.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none", the
    last inheriting ``torch.backends.fp32_precision``); once it is set, reading the legacy
    ``allow_tf32`` raises (torch 2.13), so the new API is read first and the legacy flag only when
    neither is set (or on older torch, which has only ``allow_tf32``).
    """
    import torch

    matmul = torch.backends.cuda.matmul
    for prec in (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if prec == "tf32":
            return True
        if prec == "ieee":
            return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (Triton's default would be TF32) unless PyTorch itself is
    allowed TF32 matmuls; half-precision inputs use tensor cores with fp32 accumulation anyway."""
    import torch

    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"
