"""Block sizes and launch parameters of the fused kernels, all in one place.

The defaults are an untuned guess for Hopper/Ampere (bf16 tensor cores, 128-wide tiles); no GPU
has measured them yet.  Under ``TRITON_INTERPRET=1`` (CPU tests) small tiles keep the interpreter
fast while still exercising masking (V and H not multiples of the block).
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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Forward: online logsumexp over vocabulary tiles; backward: recompute + dX/dW atomics.
FORWARD_DEFAULT = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
BACKWARD_DEFAULT = KernelConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
INTERPRET = KernelConfig(block_n=16, block_v=32, block_h=16, num_warps=1, num_stages=1)

# Enough vocabulary splits in the forward that the grid fills the GPU even when N is small.
TARGET_PROGRAMS = 4 * 132

# The backward accumulates dW in fp32 one vocabulary slab at a time, bounding that buffer to
# DW_SLAB_BYTES (it is written straight into the gradient when the weight is fp32 and fits).
DW_SLAB_BYTES = 256 * 1024 * 1024


def forward_config() -> KernelConfig:
    return INTERPRET if interpreting() else FORWARD_DEFAULT


def backward_config() -> KernelConfig:
    return INTERPRET if interpreting() else BACKWARD_DEFAULT


def dot_precision(dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (Triton's default would be TF32) unless PyTorch itself is
    allowed TF32 matmuls; half-precision inputs use tensor cores with fp32 accumulation anyway."""
    import torch

    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
