"""The measurement: decoder -> final hidden states -> fused target log-probabilities (:func:`probe`)."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import torch

from ..functional import target_logprob
from ..integrations.hf.head import _logit_transform
from .continuum import DEFAULT_CUT_POINTS, _check_cut_points
from .data import IGNORE_INDEX
from .result import ProbeResult, summarise

# On CPU the reference backend materialises [chunk, V] fp32 logits: bound that block (~256 MB).
_CPU_LOGIT_ELEMENTS = 1 << 26


@dataclass
class _Route:
    decoder: Any
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    logit_scale: Optional[float]


def _route(model) -> _Route:
    """Find the decoder, the LM head and the config's logit transforms through public APIs."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT wrappers
        model = model.get_base_model()
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"cannot probe {name}: it is an encoder-decoder model; the probe measures decoder-only "
                         f"causal LMs (the paper's setting)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"cannot probe {name}: it has no LM head (get_output_embeddings() is missing or "
                         f"returned None); the probe needs a causal language model")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"cannot probe {name}: its LM head {type(head).__name__} has no floating [vocab, hidden] "
                         f"weight (quantised heads are not supported)")
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        raise ValueError(f"cannot probe {name}: its LM head weight is a sharded DTensor; probe an unsharded copy")
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(model, "model", None)
    if decoder is None or not callable(decoder) or decoder is model:
        raise ValueError(f"cannot probe {name}: no decoder found (model.get_decoder() / model.model)")
    # the same reading of the config as the training patch (the probe's check catches any other use)
    scale, softcap = _logit_transform(model)
    return _Route(decoder, weight, bias, softcap, scale)


def _hidden(route: _Route, input_ids, attention_mask) -> torch.Tensor:
    out = route.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _verify(model, route: _Route, input_ids: torch.Tensor, attention_mask, backend: str) -> None:
    """Check on a few real tokens that decoder + LM head + transforms reproduce the model's logits,
    so a model family with another head transform is refused instead of silently mismeasured, and
    that the fused log-probabilities agree with the log-softmax of those logits."""
    row = input_ids[0]
    if attention_mask is not None:
        row = row[attention_mask[0].bool()]
    x = row[:32][None]
    out = model(input_ids=x, use_cache=False)
    ref = getattr(out, "logits", None)
    if not isinstance(ref, torch.Tensor):
        warnings.warn(f"{type(model).__name__} returned no logits; the probe could not verify that it "
                      f"reproduces the model's LM head", stacklevel=3)
        return
    hidden = _hidden(route, x, None)[0].to(route.weight.device)
    z = hidden.float() @ route.weight.float().T
    if route.bias is not None:
        z = z + route.bias.float()
    if route.logit_scale is not None:
        z = z * route.logit_scale
    if route.softcap is not None:
        z = route.softcap * torch.tanh(z / route.softcap)
    ref = ref[0].float().to(z.device)
    if ref.shape != z.shape:
        raise ValueError(f"cannot probe {type(model).__name__}: its logits have shape {tuple(ref.shape)}, "
                         f"the decoder + LM head give {tuple(z.shape)}")
    half = route.weight.dtype in (torch.float16, torch.bfloat16)
    tol = (2e-2 if half else 1e-3) * (1.0 + float(ref.abs().max()))
    err = float((z - ref).abs().max())
    if not err <= tol:
        raise ValueError(
            f"cannot probe {type(model).__name__}: decoder + LM head (softcap={route.softcap}, "
            f"logit_scale={route.logit_scale}) do not reproduce the model's own logits (max |diff| {err:.3g} > "
            f"{tol:.3g}); its forward transforms the logits in a way the probe does not know. "
            f"Pass verify=False only if you know the difference is harmless.")
    if x.shape[1] < 2:
        return
    target = x[0, 1:].to(route.weight.device)
    want = torch.log_softmax(z[:-1], dim=-1).gather(-1, target[:, None])[:, 0]
    got = target_logprob(hidden[:-1].to(route.weight.dtype), route.weight, target, route.bias,
                         softcap=route.softcap, logit_scale=route.logit_scale, backend=backend).float()
    err = float((got - want).abs().max())
    if not err <= (2e-2 if half else 1e-4) * (1.0 + float(want.abs().max())):
        raise RuntimeError(
            f"fused_objectives.target_logprob (backend={backend!r}) disagrees with the log-softmax of the model's "
            f"logits by up to {err:.3g} on {target.numel()} tokens; refusing to report its statistics. This is a "
            f"bug in that backend: please report it, and pass backend='reference' meanwhile.")


def _as_tensor(x, name: str, device) -> torch.Tensor:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"batch field {name!r} must have shape [batch, seq], got {tuple(t.shape)}")
    return t.to(device)


def _progress(iterable, enabled: bool, total: Optional[int]):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="probe", unit="batch", file=sys.stderr)


def probe(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    ignore_index: int = IGNORE_INDEX,
    cut_points: Sequence[float] = DEFAULT_CUT_POINTS,
    verify: bool = True,
    progress: bool = False,
    total: Optional[int] = None,
    backend: str = "auto",
    chunk_tokens: Optional[int] = None,
) -> ProbeResult:
    """Measure the base model's probability of the reference tokens: a forward pass only.

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM``, possibly wrapped by PEFT or patched by
            :func:`fused_objectives.patch_model`); its decoder and LM head are used directly, with
            the config's ``final_logit_softcapping`` / ``logit_scale`` / ``logits_scaling``.
        batches: iterable of mappings with ``input_ids`` ``[B, T]``, optional ``attention_mask``
            and ``labels`` (Hugging Face layout: same shape as ``input_ids``, ``ignore_index`` where
            not scored; the token at ``t`` is scored from position ``t - 1``).  Without ``labels``
            every attended token but the first is scored.  :func:`make_batches` builds them.
        cut_points: ``(low, high)`` heuristic cut-points on mean p for the recommendation.
        verify: first check on up to 32 tokens that decoder + LM head reproduce ``model(...).logits``
            (a model whose forward transforms logits otherwise is refused with a ``ValueError``) and
            that ``target_logprob`` agrees with their log-softmax (else ``RuntimeError``).
        progress: show a tqdm progress bar (``total`` batches, when known).
        backend: passed to :func:`fused_objectives.target_logprob`.
        chunk_tokens: tokens per ``target_logprob`` call; default all of a batch on GPU and a
            bounded block on CPU (where the reference backend materialises that block's logits).

    Returns a :class:`ProbeResult`: the mean p over all scored tokens equals
    ``softmax(model(input_ids).logits)`` at the shifted labels, averaged over the same tokens.
    """
    _check_cut_points(cut_points)
    route = _route(model)
    weight = route.weight
    if chunk_tokens is None and weight.device.type != "cuda":
        chunk_tokens = max(1, _CPU_LOGIT_ELEMENTS // weight.shape[0])
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    try:
        total = total if total is not None else len(batches)  # type: ignore[arg-type]
    except TypeError:
        pass
    in_device = weight.device
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and isinstance(getattr(embed, "weight", None), torch.Tensor):
        in_device = embed.weight.device

    was_training = getattr(model, "training", False)
    model.eval()
    logps: List[torch.Tensor] = []
    n_batches = 0
    try:
        with torch.no_grad():
            for b, batch in enumerate(_progress(batches, progress, total)):
                if not isinstance(batch, Mapping) or "input_ids" not in batch:
                    raise ValueError(f"batch {b}: expected a mapping with 'input_ids' (and optionally "
                                     f"'attention_mask', 'labels'), got {type(batch).__name__}")
                ids = _as_tensor(batch["input_ids"], "input_ids", in_device).long()
                mask = _as_tensor(batch.get("attention_mask"), "attention_mask", in_device)
                labels = _as_tensor(batch.get("labels"), "labels", in_device)
                if labels is None:
                    labels = ids.masked_fill(mask == 0, ignore_index) if mask is not None else ids
                for name, t in (("attention_mask", mask), ("labels", labels)):
                    if t is not None and t.shape != ids.shape:
                        raise ValueError(f"batch {b}: {name} shape {tuple(t.shape)} differs from "
                                         f"input_ids shape {tuple(ids.shape)}")
                if verify and n_batches == 0:
                    _verify(model, route, ids, mask, backend)
                n_batches += 1
                hidden = _hidden(route, ids, mask)
                # hidden[:, t] predicts labels[:, t + 1]; score only those positions, before any GEMM
                target = labels[:, 1:].long()
                keep = target != ignore_index
                if mask is not None:
                    keep &= mask[:, 1:].bool()
                h = hidden[:, :-1][keep].to(weight.device)
                t = target[keep].to(weight.device)
                if h.dtype != weight.dtype:
                    h = h.to(weight.dtype)
                step = chunk_tokens or max(1, t.numel())
                for s in range(0, t.numel(), step):
                    lp = target_logprob(h[s:s + step], weight, t[s:s + step], route.bias,
                                        ignore_index=ignore_index, softcap=route.softcap,
                                        logit_scale=route.logit_scale, backend=backend)
                    logps.append(lp.float().cpu())
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("no batches to probe: the data is empty")
    logp = torch.cat(logps) if logps else torch.empty(0)
    return summarise(logp, cut_points, None, {"batches": n_batches})
