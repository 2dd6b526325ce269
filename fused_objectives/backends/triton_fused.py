"""The fused-tile strategy (``backend="triton_fused"``): logits never leave the chip.

Forward (kernels/forward.py): each program computes ``[BLOCK_N, BLOCK_V]`` logits tiles with
``tl.dot`` and merges them into an online logsumexp / argmax / target logit (and, when asked, the
entropy and ``sum_j u_j z_j``).  Backward (kernels/backward.py): recomputes every tile, forms
``dz = c (onehot - p) + b p + g u`` in the tile epilogue and adds ``dz @ W`` and ``dz^T @ X`` into
fp32 dX and a 128 MiB fp32 dW slab with relaxed atomics.  4 GEMMs' worth of tensor-core work (the backward
recomputes the logits) plus the atomics' L2 traffic, but no workspace beyond the gradients' fp32
copies: the smallest-memory strategy.  No ``forward_with_grad``: scalar losses also take forward +
backward here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import configs
from ..options import LogitOptions
from . import triton_common


def dot_fp32(dtype: torch.dtype) -> bool:
    # the interpreter's bf16 tl.dot is wrong (see the design notes): upcast tiles there
    return dtype == torch.float32 or (configs.interpreting() and dtype == torch.bfloat16)


def _check_dot(dot: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if dot is not None and (dot.dim() != 1 or dot.shape[0] != weight.shape[0] or dot.device != weight.device):
        raise ValueError(f"dot must be a [V] = [{weight.shape[0]}] vector on {weight.device}; got shape "
                         f"{tuple(dot.shape)} on {dot.device}")


class TritonFusedBackend:
    """Fused Triton tile kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton_fused"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return triton_common.unavailable_reason(self.name, device)

    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions, row_stats: bool = False,
                dot: Optional[torch.Tensor] = None):
        """``(logp, state, argmax, rows [3, N])``: rows = (lse, entropy if ``row_stats``, ``sum_j dot_j
        z_j`` if ``dot``), the last two compiled in only when asked for (NaN otherwise)."""
        from ..kernels.forward import fused_forward

        _check_dot(dot, weight)
        return fused_forward(hidden, weight, bias, target, valid, opts, dot_fp32(hidden.dtype),
                             entropy=row_stats, dot=dot)

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions,
                 needs: Tuple[bool, bool, bool], dot: Optional[torch.Tensor] = None):
        """Gradients of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` for ``coef`` [N] (c), [2, N]
        (c, b) or [3, N] (c, b, g; with ``dot``)."""
        from ..kernels.backward import fused_backward

        _check_dot(dot, weight)
        return fused_backward(hidden, weight, bias, target, state, coef, opts, needs, dot_fp32(hidden.dtype),
                              dot=dot)
