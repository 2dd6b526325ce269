"""The Triton backend: the fused kernels behind the fused-backend interface."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import configs
from ..options import LogitOptions


class TritonBackend:
    """Fused Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"Triton is not installed ({exc}); install it or use backend='reference'"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and configs.interpreting():
            return None
        if device.type == "cpu":
            return ("backend='triton' needs CUDA tensors; on CPU tensors it runs only under Triton's "
                    "interpreter (set TRITON_INTERPRET=1 before importing fused_objectives), "
                    "otherwise use backend='reference'")
        return f"backend='triton' does not support device {device}"

    @staticmethod
    def _dot_fp32(dtype: torch.dtype) -> bool:
        # the interpreter's bf16 tl.dot is wrong (see the design notes): upcast tiles there
        return dtype == torch.float32 or (configs.interpreting() and dtype == torch.bfloat16)

    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions):
        from ..kernels.forward import fused_forward

        return fused_forward(hidden, weight, bias, target, valid, opts, self._dot_fp32(hidden.dtype))

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions,
                 needs: Tuple[bool, bool, bool]):
        from ..kernels.backward import fused_backward

        return fused_backward(hidden, weight, bias, target, state, coef, opts, needs, self._dot_fp32(hidden.dtype))
