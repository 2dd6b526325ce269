"""Vocabulary-parallel LM head: the fused loss on a weight sharded over its vocabulary rows.

A weight that is a ``torch.distributed`` DTensor with placement ``Shard(0)`` (on a 1-D mesh, or on
one dimension of a larger mesh whose other dimensions are ``Replicate``; torchtitan's
``ColwiseParallel`` LM head) is handled by :func:`localize`: the functional layer hands it the
DTensor weight (and bias) and the resolved backend, and gets back the local tensors and a
:class:`VocabParallelBackend` that implements the backend contract (``backends/__init__.py``) on
the local shard and combines the per-token statistics across the tensor-parallel group.  Every
objective, reduction and option of the functional layer therefore works unchanged.

Each rank ``k`` holds the rows ``[o_k, o_k + V_k)`` of the weight (``torch.chunk``'s split, so an
uneven ``V`` works and a rank may hold no rows).  Forward, per token: the inner backend computes
the shard's ``lse_k``, the log-probability of the target when this shard holds it (target 0, unused,
otherwise), the shard's argmax, entropy ``H_k`` and ``dotz_k``; one all-gather of a ``[k, N]``
float64 block (no ``[N, V]`` tensor, no weight gather) then gives, on every rank:

- ``LSE = logsumexp_k lse_k``;
- ``logp = logp_owner - log1p(sum_{k != owner} exp(lse_k - lse_owner))`` (the owner's own,
  confident-token-accurate value, corrected by the other shards' mass);
- ``H = sum_k r_k (H_k + LSE - lse_k)`` with ``r_k = exp(lse_k - LSE)``;
- ``dotz = sum_k dotz_k``;
- the global argmax: the shard maxima's values (the local argmax row's logit, from an ``[N, H]``
  gather-dot in float32, transforms applied) compared across ranks, ties going to the lower index
  (two shards' maxima closer than the GEMMs' rounding may be ordered differently than in an
  unsharded pass, as two GEMM tilings may).

Backward of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i``: on the shard the logit gradient is
``c [y in shard] onehot - (c - b) r p_local + g u``, which is the inner backend's formula with
``c' = c [y in shard]`` and ``b' = c' + r (b - c)``; for the owner ``b'`` is formed as
``c (1 - r) + r b`` with ``1 - r = -expm1(lse_k - LSE)``, so ``1 - P`` of a confident target stays
accurate.  The inner's partial ``dX`` is all-reduced (summed, in float32 for half inputs) over the
group; ``dW`` / ``db`` are the local shard's and reach the DTensor parameters through
``to_local``'s autograd with the weight's placement.

``forward_with_grad`` is not offered, so the functional layer takes the per-token path (forward,
then backward: four GEMMs).  An inner ``forward_with_grad`` calls the objective per token chunk,
which here would need the global statistics, i.e. collectives inside the inner backend's chunk loop;
its chunk count depends on the local shard (uneven shards, empty shards, backends choosing chunks
by ``V_k``), so ranks would issue different numbers of collectives and deadlock.  Forward +
objective + backward in one call would cost the same four GEMMs as the per-token path, so it buys
nothing.

Every rank of the tensor-parallel group must make the call (collectives); a plain ``hidden`` is
assumed identical across the group (replicated), as ``ColwiseParallel``'s input is.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch

__all__ = ["is_dtensor", "localize", "VocabParallelBackend", "head_output_like", "local_view"]

_HALF = (torch.float16, torch.bfloat16)
_GATHER_ROWS = 2048  # token rows per chunk of the argmax gather-dot (fp32 [rows, H] copies at a time)


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed`` DTensor.  Imports nothing: no DTensor exists before
    ``torch.distributed.tensor`` is imported; and traceable by ``torch.compile`` (no graph break)."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(x, cls)


def _placement_names(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _shard_dim(name: str, t) -> int:
    """The mesh dimension over which DTensor ``t`` is ``Shard(0)`` (all others ``Replicate``)."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = []
    for i, p in enumerate(t.placements):
        if type(p) is Shard and p.dim in (0, -t.dim()):
            sharded.append(i)
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"{name} is a DTensor with placements {_placement_names(t.placements)} on mesh "
                f"{tuple(t.device_mesh.shape)}; the vocabulary-parallel loss needs Shard(0) (rows = vocabulary) on "
                f"one mesh dimension and Replicate on the others (e.g. ColwiseParallel's LM head); "
                f"redistribute it or pass the full tensor")
    if len(sharded) != 1:
        raise ValueError(
            f"{name} is a DTensor with placements {_placement_names(t.placements)}; the vocabulary-parallel loss "
            f"needs exactly one mesh dimension with Shard(0) and Replicate on the others")
    return sharded[0]


def _chunk_bounds(vocab: int, parts: int) -> list:
    """``[o_0, ..., o_parts]``: ``torch.chunk``'s split of ``vocab`` rows (DTensor's ``Shard``)."""
    full = -(-vocab // parts)
    return [min(vocab, full * k) for k in range(parts + 1)]


def localize(hidden, weight, bias, impl):
    """``(hidden_local, weight_local, bias_local, backend)`` for a DTensor ``weight`` sharded on
    its vocabulary rows: the local tensors (through ``to_local``, so gradients return to the
    DTensors with their placements) and a :class:`VocabParallelBackend` around ``impl`` (a fused
    backend object, or the reference backend).  Raises ``ValueError`` for any other layout."""
    if not is_dtensor(weight):
        raise ValueError(f"weight must be a DTensor sharded on its rows (Shard(0)) for the vocabulary-parallel "
                         f"loss, got a {type(weight).__name__}")
    dim = _shard_dim("weight", weight)
    mesh = weight.device_mesh
    if bias is not None:
        if not is_dtensor(bias):
            raise ValueError("bias is a plain tensor but weight is a DTensor sharded on the vocabulary; pass the "
                             "bias as a DTensor with the weight's placements (ColwiseParallel does), or no bias")
        if bias.device_mesh != mesh or tuple(bias.placements) != tuple(weight.placements):
            raise ValueError(f"bias's DTensor layout {_placement_names(bias.placements)} on mesh "
                             f"{tuple(bias.device_mesh.shape)} must equal the weight's "
                             f"{_placement_names(weight.placements)} on mesh {tuple(mesh.shape)}")
    if is_dtensor(hidden):
        from torch.distributed.tensor import Replicate

        if not all(isinstance(p, Replicate) for p in hidden.placements):
            raise ValueError(
                f"hidden is a DTensor with placements {_placement_names(hidden.placements)}; the vocabulary-"
                f"parallel loss needs the hidden states replicated over the tensor-parallel group (a plain "
                f"tensor or a DTensor with Replicate placements): redistribute it to Replicate first")
        hidden = hidden.to_local()
    if isinstance(impl, str):
        if impl != "reference":
            raise TypeError(f"impl must be a backend object or 'reference', got {impl!r}")
        from .backends import reference

        impl = reference.BACKEND
    parts = mesh.size(dim)
    rank = mesh.get_local_rank(dim)
    bounds = _chunk_bounds(weight.shape[0], parts)
    w_local = weight.to_local()
    if w_local.shape[0] != bounds[rank + 1] - bounds[rank]:
        raise ValueError(f"weight's local shard has {w_local.shape[0]} rows on rank {rank} of {parts}, but Shard(0) "
                         f"of {weight.shape[0]} rows gives it {bounds[rank + 1] - bounds[rank]} (rows "
                         f"[{bounds[rank]}, {bounds[rank + 1]})); an unusual sharding is not supported")
    b_local = None if bias is None else bias.to_local()
    backend = VocabParallelBackend(impl, mesh.get_group(dim), rank, bounds)
    return hidden, w_local, b_local, backend


def local_view(x):
    """This rank's part of ``x`` (``to_local()``, differentiable) when it is a DTensor, else ``x``."""
    return x.to_local() if is_dtensor(x) else x


def head_output_like(value: torch.Tensor, weight) -> torch.Tensor:
    """``value`` (this rank's ``[..., k]`` block) as a DTensor laid out like the output of a
    vocabulary-sharded head with weight ``weight``: ``Shard(-1)`` where the weight is ``Shard(0)``,
    ``Replicate`` elsewhere (what ``ColwiseParallel``'s output hook expects from its module)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dim = _shard_dim("weight", weight)
    placements = [Shard(value.dim() - 1) if i == dim else Replicate() for i in range(weight.device_mesh.ndim)]
    return DTensor.from_local(value, weight.device_mesh, placements, run_check=False)


def _transform(z: torch.Tensor, opts) -> torch.Tensor:
    if opts.logit_scale is not None:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z


class VocabParallelBackend:
    """A backend (contract v2) computing the loss of a vocabulary-sharded head: ``inner`` runs on
    this rank's rows ``[bounds[rank], bounds[rank + 1])`` and the per-token statistics are
    combined over ``group``.  Made by :func:`localize` for one call (it keeps the inner backend's
    forward state for the backward)."""

    #: a graph of the gradient (``create_graph=True``) would need the materialised logits of every
    #: shard; the autograd layer refuses it for this backend
    supports_double_backward = False

    def __init__(self, inner, group, rank: int, bounds: list):
        self.inner = inner
        self.group = group
        self.rank = rank
        self.bounds = list(bounds)
        self.offset = bounds[rank]
        self.size = bounds[rank + 1] - bounds[rank]
        self.vocab = bounds[-1]
        self._inner_state = None
        self._forwarded = False
        inner_name = getattr(inner, "name", type(inner).__name__)
        self.name = f"{inner_name} (vocabulary-parallel over {len(bounds) - 1} ranks)"

    def unavailable_reason(self, device):
        return self.inner.unavailable_reason(device)

    # ----------------------------------------------------------------------------- helpers
    def _local_target(self, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(own, local target)``: whether this shard holds the target, and its row here (0 if not)."""
        own = (target >= self.offset) & (target < self.offset + self.size)
        return own, torch.where(own, target - self.offset, torch.zeros_like(target))

    def _local_dot(self, dot: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if dot is None:
            return None
        if is_dtensor(dot):
            from torch.distributed.tensor import Replicate

            if all(isinstance(p, Replicate) for p in dot.placements):
                dot = dot.to_local()
            else:
                _shard_dim("dot", dot)
                local = dot.to_local()
                if local.shape[0] != self.size:
                    raise ValueError(f"dot's local shard has {local.shape[0]} entries, the weight's {self.size}")
                return local
        if dot.dim() != 1 or dot.shape[0] != self.vocab:
            raise ValueError(f"dot must have shape [V] = ({self.vocab},), got {tuple(dot.shape)}")
        return dot[self.offset:self.offset + self.size]

    def _max_logit(self, hidden, weight, bias, argmax, opts) -> torch.Tensor:
        """The final logit of each row's local argmax (float32), by a gather-dot in row chunks."""
        idx = argmax.clamp(0, self.size - 1)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], _GATHER_ROWS):
            e = min(s + _GATHER_ROWS, hidden.shape[0])
            z = (hidden[s:e].float() * weight[idx[s:e]].float()).sum(-1)
            if bias is not None:
                z = z + bias[idx[s:e]].float()
            out[s:e] = _transform(z, opts)
        return out

    # ----------------------------------------------------------------------------- contract
    def forward(self, hidden, weight, bias, target, valid, opts, row_stats: bool = False,
                dot: Optional[torch.Tensor] = None):
        import torch.distributed as dist

        if self._forwarded:
            raise RuntimeError("a VocabParallelBackend serves one forward; call fused_objectives.parallel.localize "
                               "again for another call")
        self._forwarded = True
        n = target.shape[0]
        dev = hidden.device
        f64 = dict(dtype=torch.float64, device=dev)
        own, t_local = self._local_target(target)
        own = own & valid
        dot_local = self._local_dot(dot)
        rows = [torch.zeros(n, **f64) for _ in range(4 + int(row_stats) + int(dot is not None))]
        if self.size > 0 and n > 0:
            logp_l, self._inner_state, am_l, st = self.inner.forward(
                hidden, weight, bias, t_local, valid, opts, row_stats=row_stats, dot=dot_local)
            zero = torch.zeros((), **f64)
            rows[0] = torch.where(valid, st[0].double(), zero)
            rows[1] = torch.where(own, logp_l.double(), zero)
            rows[2] = torch.where(valid, self._max_logit(hidden, weight, bias, am_l, opts).double(), zero)
            rows[3] = (am_l.clamp(0, self.size - 1) + self.offset).double()
            k = 4
            if row_stats:
                rows[k] = torch.where(valid, st[1].double(), zero)
                k += 1
            if dot is not None:
                rows[k] = torch.where(valid, st[2].double(), zero)
        else:  # a rank without rows (or no tokens): no mass, no candidate for the argmax
            rows[0].fill_(float("-inf"))
            rows[2].fill_(float("-inf"))
        mine = torch.stack(rows)
        parts = [torch.empty_like(mine) for _ in range(len(self.bounds) - 1)]
        dist.all_gather(parts, mine, group=self.group)
        every = torch.stack(parts)  # [T, k, N]
        lse_all = every[:, 0]
        lse = torch.logsumexp(lse_all, dim=0)
        # the target's owner, from the bounds (every rank knows them)
        lo = torch.tensor(self.bounds[:-1], device=dev)[:, None]
        hi = torch.tensor(self.bounds[1:], device=dev)[:, None]
        owner = (target[None] >= lo) & (target[None] < hi)  # [T, N]
        owned = owner.any(dim=0)
        lse_owner = torch.where(owner, lse_all, torch.zeros((), **f64)).sum(dim=0)
        logp_owner = every[:, 1].sum(dim=0)
        others = torch.where(owner | torch.isneginf(lse_all), torch.zeros((), **f64),
                             torch.exp(lse_all - lse_owner))
        rest = others.sum(dim=0)
        shift = torch.where(torch.isfinite(rest), torch.log1p(rest), lse - lse_owner)
        logp = torch.where(owned, logp_owner - shift, torch.full((), float("nan"), **f64))
        best = every[:, 2].argmax(dim=0)  # the first maximum: the lowest rank, so the lowest index
        argmax = every[:, 3].gather(0, best[None])[0].long()
        out_rows = torch.zeros(3, n, dtype=torch.float32, device=dev)
        out_rows[0] = lse.float()
        r_all = torch.exp(lse_all - lse)
        k = 4
        if row_stats:
            contrib = torch.where(r_all > 0, r_all * (every[:, k] + lse - lse_all), torch.zeros((), **f64))
            out_rows[1] = contrib.sum(dim=0).float()
            k += 1
        if dot is not None:
            out_rows[2] = every[:, k].sum(dim=0).float()
        # backward state: d = lse_k - LSE of this rank's shard (0 where invalid or empty)
        d = torch.where(valid & torch.isfinite(lse_all[self.rank]), lse_all[self.rank] - lse, torch.zeros((), **f64))
        if self.size == 0:
            d = torch.full_like(d, float("-inf"))
        return logp.float(), d.float(), argmax, out_rows

    def backward(self, hidden, weight, bias, target, state, coef, opts, needs, dot: Optional[torch.Tensor] = None):
        import torch.distributed as dist

        d = state
        if coef.dim() == 1:
            c, b, g = coef, torch.zeros_like(coef), None
        else:
            c, b = coef[0], coef[1]
            g = coef[2] if coef.shape[0] > 2 else None
        own, t_local = self._local_target(target)
        r = torch.exp(d)
        omr = -torch.expm1(d)
        c_local = torch.where(own, c, torch.zeros_like(c))
        b_local = torch.where(own, c * omr + r * b, r * (b - c))
        parts = [c_local, b_local] + ([g] if g is not None else [])
        coef_local = torch.stack(parts).contiguous()
        if self.size > 0 and target.shape[0] > 0:
            dx, dw, db = self.inner.backward(hidden, weight, bias, t_local, self._inner_state, coef_local, opts,
                                             needs, dot=self._local_dot(dot) if g is not None else None)
        else:
            dx = torch.zeros_like(hidden) if needs[0] else None
            dw = torch.zeros_like(weight) if needs[1] else None
            db = torch.zeros_like(bias) if (len(needs) > 2 and needs[2] and bias is not None) else None
        if needs[0]:
            if dx is None:
                dx = torch.zeros_like(hidden)
            if dx.dtype in _HALF:
                acc = dx.float()
                dist.all_reduce(acc, group=self.group)
                dx = acc.to(hidden.dtype)
            else:
                dist.all_reduce(dx, group=self.group)
        return dx, dw, db
