"""The chunked strategy (``backend="triton_chunked"``): library GEMMs + Triton row kernels, no atomics.

**Scalar losses (mean / sum): gradients in the forward, three GEMMs** (``forward_with_grad``).
The valid rows are compacted once (``valid.nonzero()``: the call's one host sync), then per chunk
of ``rows`` tokens:

1. ``z = X_c @ W^T`` with ``torch.mm`` (cuBLAS on CUDA) into a reused ``[rows, V]`` buffer in the
   input dtype (fp32 accumulation inside the GEMM, one rounding: what eager PyTorch does);
2. ``row_stats_kernel`` (kernels/rows.py): bias / scale / soft-cap in fp32, row max, argmax,
   ``rest = sum exp(z - m)`` without the argmax's own term, target logit (and, when a ``dot``
   vector u is given, ``dotz = sum_j u_j z_j``); then on ``[rows]`` vectors ``log_norm =
   log1p(rest)``, ``lse = m + log_norm``, ``logp = z_t - m - log_norm``, ``1 - p = -expm1(logp)``
   (confident tokens keep their digits), and the loss's coefficients through ``coef_fn(logp, lse,
   dotz, target, valid)``: ``c = dSum/dlogp`` and optionally ``b = dSum/dlse``, ``g = dSum/ddotz``
   (autograd on the ``[rows]`` vectors; the backend contract in ``backends/__init__.py``);
3. ``dz_kernel`` overwrites the buffer in place with ``c (onehot - p) + b p + g u`` (times the
   soft-cap's ``1 - tanh^2`` and ``logit_scale``) in the input dtype (the ``b`` / ``u`` terms are
   compile-time switches: the classic ``[rows]`` coefficient compiles to the ``c`` kernel alone);
4. ``dX_c = dz @ W`` (written once per row) and ``dW += dz^T @ X_c`` with ``torch.mm``;
   ``db += dz.sum(0)`` in fp32.

**Sync-free mode** (for CUDA graphs and ``torch.compile``-friendly loops): no compaction and no host
sync at all; every row is processed (ignored rows get zero coefficients and a zeroed hidden state,
so they contribute exactly nothing, but they do cost their GEMM FLOPs).  It is on when the
environment variable ``FUSED_OBJECTIVES_SYNC_FREE=1`` is set, when the module attribute
``SYNC_FREE`` is set to True (``False`` forces compaction; ``None``, the default, defers to the
variable), and always while a CUDA graph is being captured (a sync there would fail).

**Per-token upstream gradients** (``forward`` / ``backward``, e.g. ``reduction="none"``,
``target_logprob``): the forward runs steps 1-2 per token chunk and keeps ``(m, log_norm, logp)``
(the same ``[3, N]`` state as the fused strategy).  The backward compacts the tokens with a non-zero
coefficient, any of ``c, b, g`` (one sync; none in sync-free mode) and walks the vocabulary in slabs: per slab
``z = X @ W_s^T`` (``[n, V_s]``), ``dz_kernel`` in place, ``dX += dz @ W_s`` (fp32 accumulator) and
``dW_s = dz^T @ X`` written once, in the input dtype.  4 GEMMs, no atomics anywhere.

**Memory** (the goal: extra memory at most 2% of eager at the llama3-8b head, N=8192, H=4096,
V=128256, bf16).  Eager (``F.cross_entropy((h @ W.T).float(), y)``) holds at least three fp32
``[N, V]`` tensors at its peak (the upcast logits, the saved log-softmax, its gradient): 3 x 4.2 GB
= 12.6 GB, so 2% is >= 252 MB.  Here the extra memory of a scalar loss is the chunk buffer
(``configs.CHUNK_BUDGET_BYTES`` = 192 MiB -> 768 rows x 128256 x 2 B = 197 MB), the gathered
``X_c`` and ``dX_c`` (768 x 4096 x 2 B = 6.3 MB each) and ``[N]`` vectors: about 210 MB, 1.7% of
eager (arithmetic, not measured: no GPU run yet).  dX and dW are the gradients themselves (the
autograd layer's ``grad * upstream`` in the backward is one more gradient-sized tensor, 1.1 GB
there, unless it scales in place).
The per-token backward adds the gathered ``X`` (``n x H``, input dtype), its fp32 dX accumulator
(``n x H x 4``) and one ``[n, H]`` product buffer: 256 MB more at N=8192.

**dW accumulation dtype.**  For bf16 / fp16 weights the scalar path accumulates dW *in place in the
input dtype* by default: each chunk's GEMM accumulates in fp32 and rounds once as it adds into dW.
Measured against float64 on CPU with torch's bf16 GEMMs (benchmarks/triton_dw_accumulation.py,
benchmarks/results/triton_dw_accumulation.txt; N=4096, H=512, V=8192): normwise relative error
2.00e-3 for eager (one GEMM), 2.79e-3 with 8 chunks, 3.02e-3 with 16, 3.33e-3 with 64, i.e. within
1.7x of eager; an fp32 buffer stays at eager's 2.00e-3 but costs ``V * H * 4`` bytes (2.1 GB at the
llama3-8b head, 17% of eager: far over the 2% goal).  ``DW_ACCUMULATE = "fp32"`` (or
``FUSED_OBJECTIVES_DW_ACCUMULATE=fp32``) selects the fp32 buffer; its adds go through bounded
vocabulary slabs (``DW_FP32_SLAB_BYTES``) of ``dz^T @ X_c`` products.

**Logit dtype.**  By default the logits buffer has the input dtype, as eager PyTorch's
``h @ W.T`` has: bf16 rounds each logit to 8 bits of mantissa before the fp32 softmax, so per-token
gradients can be percents off (measured on CPU, ``fused-objectives bench --hidden 32 --vocab 500
--tokens 64 --dtype bf16 --objective neg_p --ignored-fraction 0.5``: worst-row relative dX error
2.1e-2, dW 2.5e-2, over the bench's 2e-2 gate, where the fused tile kernels' fp32 logits give 2.2e-3).
``LOGITS_FP32 = True`` (or ``FUSED_OBJECTIVES_LOGITS_FP32=1``) keeps half-precision logits in fp32
(cuBLAS with ``out_dtype=torch.float32`` where torch has it; else an fp32 copy of W per call) and
writes the gradient into a second, input-dtype buffer: 6 bytes per logit instead of 2, so a third of
the rows per chunk under the same budget (256 at the llama3-8b head) and three times the chunks, each
of which re-reads and re-writes dW (1 GB + 1 GB in bf16): a prediction of up to ~13 ms more on an H100
there.  That bench configuration passes the gate in this mode.

**fp16** inputs take the scalar path in fp32 (an fp32 copy of W, fp32 chunk buffer, GEMMs, dX and
dW): the stored gradients are multiplied by the upstream scalar (the mean's ``1/n``, a loss
scaler's factor) only in the backward, and before that ``c * p`` underflows fp16's range for small
coefficients (a GradScaler could not rescue it).  bf16 has fp32's range and stays in bf16.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..kernels import configs
from ..options import CoefFn, LogitOptions
from . import triton_common

#: None: follow FUSED_OBJECTIVES_SYNC_FREE; True / False: force the sync-free / compacting mode.
SYNC_FREE: Optional[bool] = None
#: None: follow FUSED_OBJECTIVES_DW_ACCUMULATE ("input" default, or "fp32"); or set "input" / "fp32".
DW_ACCUMULATE: Optional[str] = None
#: Largest temporary of the fp32 dW mode's slab products (bytes).
DW_FP32_SLAB_BYTES = 64 * 1024 * 1024
#: Narrowest vocabulary slab of the per-token backward (below it, token rows are chunked instead).
MIN_SLAB_COLS = 256
#: None: follow FUSED_OBJECTIVES_LOGITS_FP32; True: bf16/fp16 logits kept in fp32 (see the docstring).
LOGITS_FP32: Optional[bool] = None



def _switch(value, attr: str, env: str) -> bool:
    """A boolean knob: the module attribute when set (a bool), else the environment variable
    ("1" / "0", empty = off); anything else is an error rather than a silent "on"."""
    if value is not None:
        if not isinstance(value, bool):
            raise TypeError(f"triton_chunked.{attr} must be None, True or False, got {value!r}")
        return value
    raw = os.environ.get(env, "0").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{env} must be '1' (on) or '0' / unset (off), got {raw!r}")
    return raw == "1"


def sync_free(device: torch.device) -> bool:
    """Whether calls on ``device`` skip the compaction (and so every host sync)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    return _switch(SYNC_FREE, "SYNC_FREE", "FUSED_OBJECTIVES_SYNC_FREE")


def dw_accumulate() -> str:
    mode = DW_ACCUMULATE if DW_ACCUMULATE is not None else os.environ.get("FUSED_OBJECTIVES_DW_ACCUMULATE", "input")
    if mode not in ("input", "fp32"):
        raise ValueError(f"dW accumulation mode must be 'input' or 'fp32', got {mode!r} "
                         f"(triton_chunked.DW_ACCUMULATE / FUSED_OBJECTIVES_DW_ACCUMULATE)")
    return mode


def logits_fp32(dtype: torch.dtype) -> bool:
    """Whether logits of ``dtype`` inputs are kept in fp32 (always for fp32 inputs)."""
    if dtype == torch.float32:
        return True
    return _switch(LOGITS_FP32, "LOGITS_FP32", "FUSED_OBJECTIVES_LOGITS_FP32")


def _bytes_per_logit(dtype: torch.dtype) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    # fp32 logits of half inputs need a second, input-dtype buffer for the gradient GEMMs
    return elt if not logits_fp32(dtype) or dtype == torch.float32 else 4 + elt


def chunk_rows(n_cols: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Rows of a ``[rows, n_cols]`` chunk of ``dtype`` inputs within the budget (a multiple of 64
    once >= 64), counting every buffer a logit needs."""
    budget = configs.CHUNK_BUDGET_BYTES if budget is None else budget
    rows = max(1, budget // max(1, n_cols * _bytes_per_logit(dtype)))
    return rows // 64 * 64 if rows >= 64 else rows


class _Buffers:
    """A chunk's raw logits (input dtype, or fp32) and where its gradient goes (in place, or a
    second input-dtype buffer when the logits are fp32 and the inputs are not)."""

    def __init__(self, dtype: torch.dtype, elements: int, device):
        self.dtype = dtype
        split = logits_fp32(dtype) and dtype != torch.float32
        self.z = torch.empty(elements, dtype=torch.float32 if split else dtype, device=device)
        self.dz = torch.empty(elements, dtype=dtype, device=device) if split else None
        self._w32 = {}

    def logits(self, x: torch.Tensor, w: torch.Tensor, cols_from: int = 0) -> torch.Tensor:
        """``x @ w^T`` into a contiguous ``[rows, cols]`` view of the logits buffer."""
        out = self.z[: x.shape[0] * w.shape[0]].view(x.shape[0], w.shape[0])
        if out.dtype == x.dtype:
            return torch.mm(x, w.T, out=out)
        if x.is_cuda and not self._w32:
            try:
                # cuBLAS: half operands, fp32 accumulation and fp32 output (torch >= 2.8)
                return torch.mm(x, w.T, out_dtype=torch.float32, out=out)
            except (TypeError, RuntimeError, NotImplementedError):
                pass
        # no fp32-output GEMM (CPU, older torch): one fp32 copy of the weight rows per call
        key = (w.data_ptr(), w.shape[0])
        if key not in self._w32:
            self._w32[key] = w.float()
        return torch.mm(x.float(), self._w32[key].T, out=out)

    def grad_out(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.dz is None else self.dz[: z.numel()].view(z.shape)


class _Rows:
    """The rows one call processes, in chunks: compacted indices, or every row (sync-free)."""

    def __init__(self, mask: torch.Tensor, compact: bool):
        self.n_total = mask.shape[0]
        self.mask = mask
        self.idx = mask.nonzero().squeeze(1) if compact else None  # the one host sync
        self.count = self.idx.numel() if compact else self.n_total

    def chunks(self, rows: int):
        for start in range(0, self.count, rows):
            stop = min(self.count, start + rows)
            yield (self.idx[start:stop] if self.idx is not None else slice(start, stop)), stop - start

    def take(self, t: torch.Tensor, sel) -> torch.Tensor:
        return t.index_select(0, sel) if self.idx is not None else t[sel]

    def put(self, dst: torch.Tensor, sel, src: torch.Tensor) -> None:
        if self.idx is not None:
            dst.index_copy_(0, sel, src)
        else:
            dst[sel] = src

    def hidden(self, hidden: torch.Tensor, sel) -> torch.Tensor:
        x = self.take(hidden, sel)
        if self.idx is None:
            # rows not processed for real still go through the GEMMs: zero them so a NaN or inf
            # there cannot leak into dW through 0 * NaN
            x = torch.where(self.mask[sel][:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x


def _row_pass(x, weight, bias, t, opts, bufs: _Buffers, entropy: bool = False, dot=None):
    """Steps 1-2: raw logits into the buffer and the row statistics ``(z, m, log_norm, logp, argmax,
    entropy | None, dotz | None)``."""
    from ..kernels import rows as row_kernels

    z = bufs.logits(x, weight)
    return (z,) + tuple(row_kernels.row_stats(z, bias, t, opts, entropy=entropy, dot=dot))


def _check_dot(dot: Optional[torch.Tensor], V: int, device) -> Optional[torch.Tensor]:
    """The ``[V]`` fp32 dot vector, contiguous on ``device`` (None passes through)."""
    if dot is None:
        return None
    if not isinstance(dot, torch.Tensor) or dot.shape != (V,) or dot.dtype != torch.float32:
        raise ValueError(f"dot must be a float32 tensor of shape [V] = [{V}], got "
                         f"{getattr(dot, 'dtype', type(dot).__name__)} {tuple(getattr(dot, 'shape', ()))}")
    if dot.device != device:
        raise ValueError(f"dot is on {dot.device}, the inputs on {device}")
    return dot.contiguous()


def _coef_rows(coef: torch.Tensor, n: int, has_dot: bool, what: str) -> int:
    """How many coefficient rows ``coef`` carries: 1 for ``[n]`` (c), 2 for ``[2, n]`` (c, b), 3 for
    ``[3, n]`` (c, b, g; only with a dot vector)."""
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(coef).__name__}")
    k = 1 if coef.dim() == 1 else (coef.shape[0] if coef.dim() == 2 else 0)
    if coef.dim() not in (1, 2) or coef.shape[-1] != n or not (k == 1 if coef.dim() == 1 else 2 <= k <= 3):
        raise ValueError(f"{what} must have shape [{n}], [2, {n}] or [3, {n}], got {tuple(coef.shape)}")
    if k == 3 and not has_dot:
        raise ValueError(f"{what} of shape [3, {n}] (c, b, g) needs the dot vector u, and none was given")
    return k


def _add_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc`` and operands of any float dtype (bounded temporaries)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    rows = max(1, DW_FP32_SLAB_BYTES // max(1, b.shape[1] * a.element_size()))
    for r0 in range(0, acc.shape[0], rows):
        acc[r0:r0 + rows].add_(torch.mm(a[r0:r0 + rows], b))


class TritonChunkedBackend:
    """Token-chunked cuBLAS GEMMs + Triton row kernels: CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``."""

    name = "triton_chunked"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return triton_common.unavailable_reason(self.name, device)

    # -- per-token primitives ------------------------------------------------------------------
    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions, row_stats: bool = False,
                dot: Optional[torch.Tensor] = None):
        """``(logp, state [3, N], argmax, rows [3, N] = (lse, entropy, dotz))``; the entropy only when
        ``row_stats``, dotz only with ``dot`` (else zeros, not computed)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._forward(hidden, weight, bias, target, valid, opts, row_stats, dot)

    def _forward(self, hidden, weight, bias, target, valid, opts, row_stats=False, dot=None):
        N = hidden.shape[0]
        V = weight.shape[0]
        dev = hidden.device
        dot = _check_dot(dot, V, dev)
        state = torch.zeros(3, N, dtype=torch.float32, device=dev)
        argmax = torch.zeros(N, dtype=torch.int64, device=dev)
        rows_out = torch.zeros(3, N, dtype=torch.float32, device=dev)
        sel_rows = _Rows(valid, compact=not sync_free(dev))
        rows = min(max(sel_rows.count, 1), chunk_rows(V, hidden.dtype))
        buf = _Buffers(hidden.dtype, rows * V, dev) if sel_rows.count else None
        for sel, _n in sel_rows.chunks(rows):
            x = sel_rows.hidden(hidden, sel)
            t = sel_rows.take(target, sel)
            _z, m, log_norm, logp, amax, ent, dotz = _row_pass(x, weight, bias, t, opts, buf, row_stats, dot)
            sel_rows.put(state.T, sel, torch.stack([m, log_norm, logp], dim=1))
            sel_rows.put(argmax, sel, amax)
            if row_stats:
                sel_rows.put(rows_out[1], sel, ent)
            if dot is not None:
                sel_rows.put(rows_out[2], sel, dotz)
        logp = state[2].clone()
        # rows where valid is False: unspecified (the autograd layer masks them)
        torch.add(state[0], state[1], out=rows_out[0])
        return logp, state, argmax, rows_out

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions,
                 needs: Tuple[bool, bool, bool], dot: Optional[torch.Tensor] = None):
        """Gradients ``(dx, dw, db)`` of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` with ``coef``
        ``[N]`` (c), ``[2, N]`` (c, b) or ``[3, N]`` (c, b, g; with ``dot``)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._backward(hidden, weight, bias, target, state, coef, opts, needs, dot)

    def _backward(self, hidden, weight, bias, target, state, coef, opts, needs, dot=None):
        from ..kernels import rows as row_kernels

        need_dx, need_dw, need_db = needs
        N, H = hidden.shape
        V = weight.shape[0]
        dev, dt = hidden.device, hidden.dtype
        f32 = torch.float32
        dot = _check_dot(dot, V, dev)
        k = _coef_rows(coef, N, dot is not None, "coef")
        dot = dot if k == 3 else None  # a dot vector with c / (c, b) only: no g term to add
        # a token is active when any of its coefficients is non-zero; NaN coefficients stay active,
        # so NaN reaches the gradients
        sel_rows = _Rows(coef != 0 if k == 1 else (coef != 0).any(dim=0), compact=not sync_free(dev))
        n = sel_rows.count
        # with active rows, each slab's first row chunk writes its dW rows: no zero fill
        dw = (torch.empty if n else torch.zeros)(V, H, dtype=weight.dtype, device=dev) if need_dw else None
        db32 = torch.zeros(V, dtype=f32, device=dev) if need_db else None
        dx32 = torch.zeros(n, H, dtype=f32, device=dev) if need_dx else None
        if n:
            sel = sel_rows.idx if sel_rows.idx is not None else slice(0, N)
            x = sel_rows.hidden(hidden, sel)
            t = sel_rows.take(target, sel)
            m = sel_rows.take(state[0], sel).contiguous()
            log_norm = sel_rows.take(state[1], sel).contiguous()
            omp = (-torch.expm1(sel_rows.take(state[2], sel))).contiguous()
            c = (sel_rows.take(coef, sel) if k == 1 else sel_rows.take(coef.T, sel).T).float().contiguous()
            # vocabulary slabs of the whole active set when the budget allows (dW_s written once);
            # otherwise row chunks too, and dW_s accumulates over them
            cols = min(V, max(MIN_SLAB_COLS, chunk_rows(n, dt) // MIN_SLAB_COLS * MIN_SLAB_COLS))
            rows = min(n, chunk_rows(cols, dt))
            # flat, so the last (narrower) slab's [rows, width] view is contiguous too
            bufs = _Buffers(dt, rows * cols, dev)
            prod = torch.empty(rows, H, dtype=dt, device=dev) if need_dx and dt != f32 else None
            for v0 in range(0, V, cols):
                v1 = min(V, v0 + cols)
                w_s = weight[v0:v1]
                for r0 in range(0, n, rows):
                    r1 = min(n, r0 + rows)
                    z = bufs.logits(x[r0:r1], w_s)
                    dz = row_kernels.softmax_grad_(z, bias, t[r0:r1], m[r0:r1], log_norm[r0:r1], omp[r0:r1],
                                                   c[..., r0:r1], opts, col0=v0, out=bufs.grad_out(z), dot=dot)
                    if need_dx:
                        if prod is None:
                            dx32[r0:r1].addmm_(dz, w_s)
                        else:
                            dx32[r0:r1].add_(torch.mm(dz, w_s, out=prod[: r1 - r0]))
                    if need_dw:
                        if r0 == 0:
                            torch.mm(dz.T, x[r0:r1], out=dw[v0:v1])
                        else:
                            dw[v0:v1].addmm_(dz.T, x[r0:r1])
                    if need_db:
                        db32[v0:v1] += dz.sum(dim=0, dtype=f32)
        dx = None
        if need_dx:
            if sel_rows.idx is None:
                dx = dx32.to(dt)
            else:
                dx = torch.zeros(N, H, dtype=dt, device=dev)
                dx.index_copy_(0, sel_rows.idx, dx32.to(dt))
        return dx, dw, None if db32 is None else db32.to(bias.dtype)

    # -- scalar losses: gradients in the forward ----------------------------------------------
    def forward_with_grad(self, hidden, weight, bias, target, valid, opts: LogitOptions, coef_fn: CoefFn,
                          needs: Tuple[bool, bool, bool], row_stats: bool = False,
                          dot: Optional[torch.Tensor] = None):
        """``(total, logp, kept, argmax, dx, dw, db, rows [3, N])``: the summed loss, per-token
        statistics, the gradients of ``total`` (None where not needed): dx / dw in the input dtype
        (dw in fp32 when ``DW_ACCUMULATE == "fp32"``), db in fp32; and ``rows = (lse, entropy,
        dotz)`` (entropy only when ``row_stats``, dotz only with ``dot``; else zeros).
        ``coef_fn(logp, lse, dotz | None, target, valid) -> (chunk total, kept, coef [r] | [2, r] | [3, r])``
        runs once per token chunk."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self._forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs, row_stats,
                                           dot)

    def _forward_with_grad(self, hidden, weight, bias, target, valid, opts, coef_fn, needs, row_stats=False,
                           dot=None):
        from ..kernels import rows as row_kernels

        need_dx, need_dw, need_db = needs
        N, H = hidden.shape
        V = weight.shape[0]
        dev, dt = hidden.device, hidden.dtype
        f32 = torch.float32
        dot = _check_dot(dot, V, dev)
        if dt == torch.float16:
            # the stored gradients wait for the upstream scalar (a loss scaler's factor) until the
            # backward: in fp16's range c * p underflows first (dz < 6e-8), so fp16 works in fp32
            weight, dt = weight.float(), f32
        compact = not sync_free(dev)
        logp_all = torch.zeros(N, dtype=f32, device=dev)
        kept_all = torch.zeros(N, dtype=torch.bool, device=dev)
        argmax_all = torch.zeros(N, dtype=torch.int64, device=dev)
        rows_all = torch.zeros(3, N, dtype=f32, device=dev)
        total = torch.zeros((), dtype=f32, device=dev)
        # compacted rows never write the ignored ones: those need zeros; sync-free writes every row
        alloc = torch.zeros if compact else torch.empty
        dx = alloc(N, H, dtype=dt, device=dev) if need_dx else None
        mode = dw_accumulate()
        dw_fp32 = need_dw and dt != f32 and mode == "fp32"
        db = torch.zeros(V, dtype=f32, device=dev) if need_db else None

        sel_rows = _Rows(valid, compact=compact)
        # with rows to process, the first chunk writes dW (input dtype): no zero fill to read back
        dw_fresh = need_dw and sel_rows.count > 0 and not dw_fp32
        dw_alloc = torch.empty if dw_fresh else torch.zeros
        dw = dw_alloc(V, H, dtype=f32 if dw_fp32 else dt, device=dev) if need_dw else None
        rows = min(max(sel_rows.count, 1), chunk_rows(V, dt))
        buf = _Buffers(dt, rows * V, dev) if sel_rows.count else None
        for sel, n in sel_rows.chunks(rows):
            x = sel_rows.hidden(hidden, sel).to(dt)
            t = sel_rows.take(target, sel)
            v = sel_rows.take(valid, sel)
            z, m, log_norm, logp, amax, ent, dotz = _row_pass(x, weight, bias, t, opts, buf, row_stats, dot)
            lse = m + log_norm
            sel_rows.put(rows_all[0], sel, lse)
            if row_stats:
                sel_rows.put(rows_all[1], sel, ent)
            if dot is not None:
                sel_rows.put(rows_all[2], sel, dotz)
            if not compact:
                # rows not valid (a zeroed hidden state, a target that may be out of range): zeros,
                # so the objective never sees a NaN it would have to mask
                zero = torch.zeros((), dtype=f32, device=dev)
                logp = torch.where(v, logp, zero)
                lse = torch.where(v, lse, zero)
                dotz = None if dotz is None else torch.where(v, dotz, zero)
                # and class 0 as their target: an ignore_index there must not index a class weight
                t = torch.where(v, t, torch.zeros((), dtype=t.dtype, device=dev))
            tot, kept, c = coef_fn(logp, lse, dotz, t, v)
            k = _coef_rows(c, n, dot is not None, "coef_fn's coefficients")
            sel_rows.put(logp_all, sel, logp)
            sel_rows.put(kept_all, sel, kept)
            sel_rows.put(argmax_all, sel, amax)
            total += tot
            if not (need_dx or need_dw or need_db):
                continue
            c = torch.where(v, c.float(), torch.zeros((), dtype=f32, device=dev)).contiguous()
            omp = (-torch.expm1(logp)).contiguous()
            dz = row_kernels.softmax_grad_(z, bias, t, m, log_norm, omp, c, opts, out=buf.grad_out(z),
                                           dot=dot if k == 3 else None)
            if need_dx:
                if compact:
                    dx.index_copy_(0, sel, torch.mm(dz, weight))
                else:
                    torch.mm(dz, weight, out=dx[sel])
            if need_dw:
                if dw_fp32:
                    _add_fp32(dw, dz.T, x)
                elif dw_fresh:
                    torch.mm(dz.T, x, out=dw)
                    dw_fresh = False
                else:
                    dw.addmm_(dz.T, x)
            if need_db:
                db += dz.sum(dim=0, dtype=f32)
        return total, logp_all, kept_all, argmax_all, dx, dw, db, rows_all
