"""``backend="triton"``, the CUDA default: picks a Triton strategy per case.

The strategies are sibling backends: ``triton_chunked`` (library GEMMs + Triton row kernels,
backends/triton_chunked.py) and ``triton_fused`` (fused tile kernels with relaxed atomics,
backends/triton_fused.py).  The rule, a **prediction from the roofline model below until a GPU run
measures both** (nothing here has run on a GPU yet):

- **scalar losses (mean / sum) with gradients: chunked, gradients in the forward.**  3 GEMMs
  (``6 N H V`` FLOPs, the useful work) instead of the 4 of any design that recomputes the logits
  in the backward, at cuBLAS efficiency; beyond the GEMMs it streams the ``[rows, V]`` buffer 6
  times (GEMM write, stats read, dz read + write, then read by the two gradient GEMMs): 12 bytes
  per logit in bf16 against ``6 H`` FLOPs per logit.  At H = 4096 that is 2,048 FLOP/B, far above
  the H100's ridge (989 TFLOP/s / 3.35 TB/s = 295 FLOP/B), so it stays GEMM-bound: predicted
  ``6 N H V / (0.75 x 989 TFLOP/s) + 12 N V / 3.35 TB/s`` = 34.8 + 3.8 ms at the llama3-8b head
  (N = 8192, V = 128256), i.e. ~1.11x three bare GEMMs at the same cuBLAS efficiency.  Each chunk's
  ``dW += dz^T X`` also reads and writes the bf16 dW (2.1 GB): 11 chunks of 768 rows move 23 GB,
  up to 6.9 ms more where cuBLAS does not hide it behind the GEMM's own 1.2 ms of math per chunk,
  so the prediction is 1.11x-1.31x; larger chunks (a larger ``CHUNK_BUDGET_BYTES``) trade memory for it.
- **per-token upstream gradients (``reduction="none"``, ``target_logprob``): the cheaper of the two
  by** :func:`predict_seconds`.  Chunked: 4 GEMMs at cuBLAS efficiency + ~14 B of buffer traffic per
  logit.  Fused: 4 GEMMs' worth of ``tl.dot`` at a lower efficiency (one 128-row tile per SM,
  up to 255 registers) + the backward's fp32 atomic adds, ``4 H (1/BLOCK_V + 1/BLOCK_N)`` bytes per logit
  (``3 H / 32`` B with its 128x64 bf16 tiles on sm_90: 384 B at H = 4096, 403 GB at the llama3-8b
  head), each a read-modify-write in L2.  Those alone (85 FLOP/B) sit below the ridge.  With the
  constants below the model picks fused only for H <= 82 in bf16/fp16 (H <= 164 in fp32: toy
  heads, e.g. the tests' shapes) and chunked for every real LM head; fused stays addressable
  (``backend="triton_fused"``) and is the strategy with no workspace beyond the gradients.

The choice depends only on shapes and dtype, so the forward and the backward of one call always
take the same strategy.  Both strategies implement backend contract v2 (per-token coefficients
``(c, b, g)`` on ``(logp, lse, dotz)``, backends/__init__.py): z-loss, label smoothing and class
weights add per-logit epilogue arithmetic and one ``[V]`` vector read, no GEMM work, so they leave
the choice as it is; the chooser hands ``row_stats``, ``dot`` and the coefficients through.  After a GPU run, the constants (or the rule) are replaced by measurements.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import configs
from ..options import LogitOptions
from . import triton_common
from .triton_chunked import TritonChunkedBackend
from .triton_fused import TritonFusedBackend

# Roofline constants (H100 SXM, published): dense bf16/fp16 tensor-core rate, HBM bandwidth, and
# assumed shares of them.  Predictions, not measurements.
PEAK_FLOPS = 989e12
HBM_BYTES_PER_S = 3.35e12
L2_ATOMIC_BYTES_PER_S = 2.0e12   # fp32 bytes added per second assumed for relaxed L2 atomics
CUBLAS_EFFICIENCY = 0.75
TRITON_TILE_EFFICIENCY = 0.55
CHUNKED_BYTES_PER_LOGIT = 7       # elements streamed per logit in the per-token chunked path


def predict_seconds(strategy: str, n: int, H: int, V: int, elt: int) -> float:
    """Roofline prediction of one per-token forward + backward (4 GEMMs' FLOPs either way)."""
    flops = 8.0 * n * H * V
    if strategy == "triton_chunked":
        return flops / (CUBLAS_EFFICIENCY * PEAK_FLOPS) + CHUNKED_BYTES_PER_LOGIT * elt * n * V / HBM_BYTES_PER_S
    if strategy == "triton_fused":
        cfg = configs.BACKWARD_HALF_SM90  # the fused backward's tile on the H100
        atomic_bytes = 4.0 * H * n * V * (1.0 / cfg.block_n + 1.0 / cfg.block_v)
        return flops / (TRITON_TILE_EFFICIENCY * PEAK_FLOPS) + atomic_bytes / L2_ATOMIC_BYTES_PER_S
    raise ValueError(f"unknown strategy {strategy!r}")


class TritonBackend:
    """Dispatches to :class:`TritonChunkedBackend` or :class:`TritonFusedBackend` (see the module
    docstring for the rule)."""

    name = "triton"

    def __init__(self):
        self.chunked = TritonChunkedBackend()
        self.fused = TritonFusedBackend()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return triton_common.unavailable_reason(self.name, device)

    def per_token_strategy(self, hidden: torch.Tensor, weight: torch.Tensor):
        n, H = hidden.shape
        V = weight.shape[0]
        elt = hidden.element_size()
        if predict_seconds("triton_fused", n, H, V, elt) < predict_seconds("triton_chunked", n, H, V, elt):
            return self.fused
        return self.chunked

    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions, row_stats: bool = False,
                dot: Optional[torch.Tensor] = None):
        return self.per_token_strategy(hidden, weight).forward(hidden, weight, bias, target, valid, opts,
                                                               row_stats=row_stats, dot=dot)

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions,
                 needs: Tuple[bool, bool, bool], dot: Optional[torch.Tensor] = None):
        return self.per_token_strategy(hidden, weight).backward(hidden, weight, bias, target, state, coef, opts, needs,
                                                                dot=dot)

    @staticmethod
    def grad_in_forward(dtype: torch.dtype) -> bool:
        """fp16 scalar losses take the per-token path: gradients formed in the forward would meet the
        loss scaler's factor only in the backward, so they must be kept in fp32 (triton_chunked
        upcasts the weight and runs fp32 GEMMs: ~521 ms predicted at the llama3-8b head on an H100,
        15x the fp16 GEMMs), while the per-token backward receives the scaled upstream gradient
        before it forms ``dz`` and runs 4 fp16 GEMMs (~4/3 of the 3-GEMM floor).  A prediction."""
        return dtype != torch.float16

    def forward_with_grad(self, hidden, weight, bias, target, valid, opts: LogitOptions, coef_fn, needs,
                          row_stats: bool = False, dot: Optional[torch.Tensor] = None):
        return self.chunked.forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs,
                                              row_stats=row_stats, dot=dot)
