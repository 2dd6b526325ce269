"""What the Triton strategies (``triton``, ``triton_chunked``, ``triton_fused``) share: where they run."""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import configs


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``: CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``; else a message saying what to do."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc}); install it or use backend='reference'"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and configs.interpreting():
        return None
    if device.type == "cpu":
        return (f"backend={name!r} needs CUDA tensors; on CPU tensors it runs only under Triton's "
                f"interpreter (set TRITON_INTERPRET=1 before importing fused_objectives), "
                f"otherwise use backend='cpu' or backend='reference'")
    return f"backend={name!r} does not support device {device}"
