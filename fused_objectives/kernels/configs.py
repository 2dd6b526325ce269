"""Block sizes, launch parameters and memory budgets of every Triton kernel, all in one place.

No GPU has measured these yet.  The fused tile kernels' configs were checked by compiling ahead of
time for sm_80 and sm_90a (``compiled.metadata.shared`` against the opt-in limits 166,912 B and
232,448 B; benchmarks/kernel_report.py does it for every kernel): half-precision tiles are
128x128x64 (forward 98,304 B on sm_90 / 65,536 B on sm_80; backward 163,840 / 131,072 B); fp32
(IEEE or TF32 dots) holds twice the bytes per element, so its H block is halved to 32, and the
backward keeps 2 pipeline stages (TF32 backward with 3 stages needed 196,608 B on sm_80; with 2:
163,840 B on sm_80, 147,456 B on sm_90).  The row kernels (kernels/rows.py) use <= 4 KB of shared
memory and 61-80 registers without spills (ptxas -v, sm_80 and sm_90a; the dz kernel needed
120-148 registers with 4 warps, hence 8).  Triton 3.9's compiler on CPU; the kernel report
(benchmarks/kernel_report.py) has the full table.  Under ``TRITON_INTERPRET=1`` (CPU tests) small tiles keep the interpreter fast
while still exercising masking (V and H not multiples of the block).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


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


# Fused tile kernels (kernels/forward.py, kernels/backward.py), per input dtype.
FORWARD_DEFAULT = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)   # bf16 / fp16
BACKWARD_DEFAULT = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)  # bf16 / fp16
FORWARD_FP32 = KernelConfig(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3)
BACKWARD_FP32 = KernelConfig(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=2)
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


def forward_config(dtype=None) -> KernelConfig:
    if interpreting():
        return INTERPRET
    return FORWARD_FP32 if _is_fp32(dtype) else FORWARD_DEFAULT


def backward_config(dtype=None) -> KernelConfig:
    if interpreting():
        return INTERPRET
    return BACKWARD_FP32 if _is_fp32(dtype) else BACKWARD_DEFAULT


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
