"""The fused-tile strategy (``backend="triton_fused"``): logits never leave the chip.

Forward (kernels/forward.py): each program computes ``[BLOCK_N, BLOCK_V]`` logits tiles with
``tl.dot`` and merges them into an online logsumexp / argmax / target logit.  Backward
(kernels/backward.py): recomputes every tile and adds ``dz @ W`` and ``dz^T @ X`` into fp32 dX and a
128 MiB fp32 dW slab with relaxed atomics.  4 GEMMs' worth of tensor-core work (the backward
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


class TritonFusedBackend:
    """Fused Triton tile kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton_fused"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return triton_common.unavailable_reason(self.name, device)

    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions, row_stats: bool = False):
        from ..kernels.forward import fused_forward

        out = fused_forward(hidden, weight, bias, target, valid, opts, dot_fp32(hidden.dtype), entropy=row_stats)
        if not row_stats:
            return out
        logp, state, argmax, ent = out
        return logp, state, argmax, torch.stack([state[0] + state[1], ent])

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions,
                 needs: Tuple[bool, bool, bool]):
        from ..kernels.backward import fused_backward

        return fused_backward(hidden, weight, bias, target, state, coef, opts, needs, dot_fp32(hidden.dtype))
