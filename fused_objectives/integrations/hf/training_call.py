"""One patched training call: the head computes the fused loss inside its own call and returns a probe;
the loss function checks what the forward did with it (``_Call``, ``_run``), TRL's fields."""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections import OrderedDict
from typing import Optional

import torch

from ...functional import linear_objective_loss
from ...parallel import head_output_like, is_dtensor, local_view
from .head import _apply_transform, _check_head, _head_params, _logit_transform, _text_config
from .refusals import UnsupportedModelError, _refuse
from .state import _ACTIVE, _MISSING, _PatchState, _active_depth
from .trainers import check_call_without_labels, check_trl_loss_type, prediction_loss_only


_PROBE = (-30.0, -4.0, -1.0, 0.0, 0.5, 2.0, 7.0, 30.0)
_HALF = (torch.float16, torch.bfloat16)


class _Tie(torch.autograd.Function):
    """Returns ``value`` unchanged, with a zero-gradient edge to ``anchor``.

    Two uses: the head's stand-in output tied to the fused loss's graph makes that graph wait for the
    head output's gradient, so the hooks ZeRO-3 / FSDP attach to the head's output (re-gathering its
    weight) run before the fused loss's backward needs that weight; and TRL's fields tied to the
    head's transformed output keep the head in the graph."""

    @staticmethod
    def forward(ctx, value, anchor):
        ctx.anchor_meta = (anchor.shape, anchor.dtype, anchor.device)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.anchor_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _tie(value, anchor):
    if torch.is_grad_enabled() and (value.requires_grad or anchor.requires_grad):
        return _Tie.apply(value, anchor)
    return value


def _same(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.to(b.device), b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a = a.item() if isinstance(a, torch.Tensor) else a
        b = b.item() if isinstance(b, torch.Tensor) else b
    return a == b


# ----------------------------------------------------------------------------- one training call
class _Call:
    """State of one patched training forward: what the head computed and what the loss must see."""

    def __init__(self, model, state, objective, labels, shift_labels, num_items, trl, keep_given=False,
                 predictions=None):
        self.model, self.state, self.objective = model, state, objective
        self.keep_given = keep_given
        # besides the loss: "logits" (the head's own output), "ids" (argmax ids) or None
        self.predictions = predictions
        self.labels, self.shift_labels, self.num_items, self.trl = labels, shift_labels, num_items, trl
        self.scale, self.softcap = _logit_transform(model)
        self.head_calls = self.loss_calls = 0
        self.head_done = False
        self.vocab = None
        self.loss = self.per_token = self.stats = self.target_shape = self.predicted = None
        self.stand_in = self.received = None

    def head_forward(self, head, original, x, *args, **kwargs):
        model, opts = self.model, self.state.options
        self.head_calls += 1
        if self.head_calls > 1:
            _refuse(model, "its forward calls the output embedding more than once")
        if args or kwargs:
            _refuse(model, "its forward calls the output embedding with extra arguments "
                           f"({len(args)} positional, keywords {sorted(kwargs)})")
        weight, bias = _head_params(model, head)
        self.vocab = weight.shape[0]
        out_dtype = weight.dtype
        h, w, b = x, weight, bias
        if torch.is_autocast_enabled(x.device.type):
            # what F.linear does under autocast
            out_dtype = torch.get_autocast_dtype(x.device.type)
            h, w = x.to(out_dtype), weight.to(out_dtype)
            b = None if bias is None else bias.to(out_dtype)
        if self.shift_labels is not None:
            target = self.shift_labels
        else:
            labels = self.labels
            pad = torch.full_like(labels[..., :1], opts.ignore_index)
            target = torch.cat([labels[..., 1:], pad], dim=-1)
        self.target_shape = tuple(target.shape)
        target = target.to(x.device).reshape(-1)
        h2 = h.reshape(-1, h.shape[-1])
        if target.numel() != h2.shape[0] and not self.keep_given:
            _refuse(model, f"its head receives {h2.shape[0]} positions (hidden {tuple(x.shape)}) for "
                           f"{target.numel()} label positions, not one position per label")
        if target.numel() != h2.shape[0]:
            raise ValueError(f"labels give {target.numel()} target positions (shape {tuple(target.shape)}) but the "
                             f"LM head received {h2.shape[0]} positions (hidden {tuple(x.shape)}); with labels, "
                             "pass logits_to_keep=0 or shift_labels shaped like the kept positions")
        if opts.normalize == "kept" and self.num_items is not None:
            raise ValueError("normalize='kept' (average over the tokens that pass the objective's gate, per "
                             "micro-batch) cannot be combined with num_items_in_batch, which Trainer passes for "
                             "gradient accumulation; use normalize='valid', or set model.accepts_loss_kwargs = "
                             "False so Trainer averages each micro-batch itself")
        common = dict(objective=self.objective, ignore_index=opts.ignore_index, normalize=opts.normalize,
                      softcap=self.softcap, logit_scale=self.scale, backend=opts.backend,
                      **opts.loss_terms(x.device))
        if self.trl:
            self.per_token, self.stats = linear_objective_loss(h2, w, target, b, reduction="none",
                                                               return_stats=True, **common)
            if opts.class_weight is not None and self.num_items is None:
                self._reweigh_for_trl(target, opts)
            n = self.stats.n_kept if opts.normalize == "kept" else self.stats.n_valid
            denom = n if self.num_items is None else torch.as_tensor(self.num_items, device=n.device)
            denom = denom.to(torch.float32)
            self.loss = self.per_token.sum() / denom.clamp(min=1)
            source = self.per_token
        elif self.predictions == "ids":
            self.loss, stats = linear_objective_loss(h2, w, target, b, num_items_in_batch=self.num_items,
                                                     return_stats=True, **common)
            self.predicted = stats.predicted.reshape(self.target_shape)
            source = self.loss
        else:
            self.loss = linear_objective_loss(h2, w, target, b, num_items_in_batch=self.num_items, **common)
            source = self.loss
        # evaluation predictions (not return_logits): the [N, V] logits for compute_metrics, without a graph
        no_graph = self.predictions == "logits" and not opts.return_logits
        if self.returns_logits:
            with torch.no_grad() if no_graph else contextlib.nullcontext():
                stand = original(x)
        else:
            probe = torch.tensor(_PROBE, dtype=out_dtype, device=x.device)
            stand = probe.expand(*x.shape[:-1], len(_PROBE))
            if is_dtensor(weight):  # a vocabulary-parallel head's output hook expects its sharded layout
                stand = head_output_like(stand, weight)
        self.stand_in = stand
        self.head_done = True
        if torch.is_grad_enabled() and source.requires_grad and not no_graph:
            return _Tie.apply(stand, source)
        return stand

    @property
    def returns_logits(self) -> bool:
        return self.state.options.return_logits or self.predictions == "logits"

    def _reweigh_for_trl(self, target, opts):
        """TRL divides the sum of ``-log_probs`` by the number of tokens; with class weights the patched mean
        divides the objective's part by the sum of the weights instead (``F.cross_entropy(weight=...)``), so
        scale that part of each token by count / sum of weights (the z-loss part keeps its count mean)."""
        stats = self.stats
        mask = stats.kept if opts.normalize == "kept" else stats.valid
        mask = mask.reshape(-1)
        z = stats.z_loss.reshape(-1) if getattr(stats, "z_loss", None) is not None else torch.zeros_like(
            self.per_token)
        weight = opts.class_weight.to(target.device, torch.float32)
        wsum = torch.where(mask, weight[target.clamp(min=0)], torch.zeros((), device=target.device)).sum()
        count = mask.sum().to(torch.float32)
        scale = torch.where(wsum > 0, count / wsum.clamp(min=torch.finfo(torch.float32).tiny),
                            torch.zeros((), device=wsum.device))
        self.per_token = (self.per_token - z) * scale + z

    def loss_function(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None,
                      ignore_index=-100, shift_labels=None, **_ignored):
        model, opts = self.model, self.state.options
        self.loss_calls += 1
        if self.loss_calls > 1:
            _refuse(model, "its forward calls loss_function more than once")
        if self.head_calls != 1 or self.loss is None:
            _refuse(model, "its forward computes logits without calling get_output_embeddings() before its loss")
        if ignore_index != opts.ignore_index:
            _refuse(model, f"its forward passes ignore_index={ignore_index} to its loss (patched with "
                           f"ignore_index={opts.ignore_index})")
        if not _same(labels, self.labels):
            _refuse(model, "its forward passes its loss labels that differ from the labels it was called with")
        if not _same(shift_labels, self.shift_labels):
            _refuse(model, "its forward passes its loss shift_labels that differ from the ones it was called with")
        if not _same(num_items_in_batch, self.num_items):
            _refuse(model, "its forward passes its loss a num_items_in_batch that differs from the one it was given")
        if vocab_size is not None and int(vocab_size) != self.vocab:
            # a family that passes vocab_size=logits.shape[-1] reads the stand-in's width: fine unless its
            # config declares a padded head whose extra rows it slices off (unpadded_vocab_size)
            unpadded = getattr(_text_config(model), "unpadded_vocab_size", None)
            reads_width = (isinstance(logits, torch.Tensor) and not self.returns_logits
                           and int(vocab_size) == logits.shape[-1] == self.stand_in.shape[-1])
            if not reads_width or (isinstance(unpadded, int) and unpadded < self.vocab):
                _refuse(model, f"its loss is over vocab_size={unpadded if reads_width else vocab_size} but its "
                               f"LM head has {self.vocab} rows")
        stand_in, logits = local_view(self.stand_in), local_view(logits)  # a vocabulary-parallel head: this rank's
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != tuple(stand_in.shape):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            _refuse(model, f"its forward reshapes or slices the logits before its loss (head output "
                           f"{tuple(stand_in.shape)}, loss received {got})")
        expected = _apply_transform(stand_in.detach(), self.scale, self.softcap)
        half = stand_in.dtype in _HALF or logits.dtype in _HALF
        rtol, atol = (2e-2, 2e-2) if half else (1e-4, 1e-4)
        if torch.compiler.is_compiling():
            # no data-dependent Python branch in a compiled graph: the same check, asserted inside it
            got = logits.detach().float()
            close = ((got - expected).abs() <= atol + rtol * expected.abs()) | (got.isnan() & expected.isnan())
            torch._assert_async(close.all(), "fused_objectives: the model's forward transforms the logits between "
                                             "its head and its loss in a way its config does not declare")
        elif not torch.allclose(logits.detach().float(), expected, rtol=rtol, atol=atol, equal_nan=True):
            _refuse(model, "its forward transforms the logits between its head and its loss in a way its config "
                           f"does not declare (expected logit_scale={self.scale}, softcap={self.softcap})")
        self.received = logits
        return _tie(self.loss, logits)


@contextlib.contextmanager
def _swapped_forward(module, fn):
    # accelerate's hooks call module._old_forward from their own forward: swap the inner one then
    name = "_old_forward" if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") else "forward"
    saved = module.__dict__.get(name, _MISSING)
    original = saved if saved is not _MISSING else getattr(type(module), name).__get__(module)
    object.__setattr__(module, name, functools.partial(fn, module, original))
    try:
        yield
    finally:
        if saved is _MISSING:
            module.__dict__.pop(name, None)
        else:
            object.__setattr__(module, name, saved)


@contextlib.contextmanager
def _swapped_loss_function(model, fn):
    saved = {k: model.__dict__[k] for k in ("_loss_function", "loss_function") if k in model.__dict__}
    model.loss_function = fn
    try:
        yield
    finally:
        model.__dict__.pop("_loss_function", None)
        model.__dict__.pop("loss_function", None)
        model.__dict__.update(saved)


def _set_field(out, key, value):
    if value is None:
        if key in out.keys():
            OrderedDict.__delitem__(out, key)
    else:
        OrderedDict.__setitem__(out, key, value)
    object.__setattr__(out, key, value)


def _labels_index(func) -> Optional[int]:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0] == "self":
        positional = positional[1:]
    return positional.index("labels") if "labels" in positional else None


def _accepts(func, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def _run(model, state: _PatchState, original, args, kwargs):
    """The patched forward: ``original`` is the bound forward it replaces."""
    trl, state.trl_pending = state.trl_pending, False
    if state.labels_idx is _MISSING:
        state.labels_idx = _labels_index(original)
    idx = state.labels_idx
    labels = kwargs.get("labels")
    if labels is None and idx is not None and len(args) > idx:
        labels = args[idx]
    _ACTIVE.depth = _active_depth() + 1
    try:
        opts = state.options
        if labels is None:
            # a Trainer computing the loss itself from the full logits (label smoothing, compute_loss_func)
            check_call_without_labels(model, opts)
            return original(*args, **kwargs)
        objective = opts.eval_objective if (opts.eval_objective is not None and not model.training) else opts.objective
        if trl:
            check_trl_loss_type(model, opts, objective)
        head = model.get_output_embeddings()
        _check_head(model, head, model.training)
        keep = kwargs.get("logits_to_keep", 0)
        keep_given = isinstance(keep, torch.Tensor) or keep not in (0, None)
        call = _Call(model, state, objective, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"), trl,
                     keep_given, _eval_predictions(model, opts, trl))
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        if _accepts(original, "return_dict"):
            kwargs["return_dict"] = True
        try:
            with _swapped_forward(head, call.head_forward), _swapped_loss_function(model, call.loss_function):
                out = original(*args, **kwargs)
        except UnsupportedModelError:
            raise
        except Exception:
            if call.head_done and not call.loss_calls:
                # the forward failed on the head's stand-in output: it computes a loss of its own from the
                # logits (the original exception is chained, for whoever debugs a new family)
                _refuse(model, "its forward does not hand the head's logits to model.loss_function unchanged: it "
                               "computes its loss itself (or reshapes the logits first)")
            raise
        if call.loss_calls != 1:
            _refuse(model, "its forward does not compute its loss through model.loss_function "
                           "(it computes the cross-entropy inline)")
        if not hasattr(out, "keys"):
            _refuse(model, f"its forward returns a {type(out).__name__}, not a ModelOutput, with return_dict=True")
        if not call.returns_logits:
            _set_field(out, "logits", None)
        if call.predicted is not None:
            _set_field(out, "predicted", call.predicted)
        if trl:
            _add_trl_fields(model, call, out)
        return out if return_dict else out.to_tuple()
    finally:
        _ACTIVE.depth -= 1


def _eval_predictions(model, opts, trl) -> Optional[str]:
    """What an evaluation call returns besides the loss (``PatchOptions.eval_predictions``): nothing in
    training, for TRL's fused-head protocol (its own fields), or when a Trainer evaluates with
    ``prediction_loss_only`` (it discards them)."""
    if model.training or trl or opts.eval_predictions == "none":
        return None
    if opts.eval_predictions == "logits" and opts.return_logits:
        return "logits"
    return None if prediction_loss_only() else opts.eval_predictions


def _add_trl_fields(model, call, out):
    """TRL's ``fused_lm_head=True`` protocol: SFTTrainer reduces ``-log_probs`` over ``label_mask``.

    ``log_probs`` holds the negated per-token objective (exactly the log-probabilities for ``nll``), so
    TRL's loss is the objective; ``is_top1`` marks the tokens whose argmax is the target; ``entropy`` is each
    token's softmax entropy from the same pass (``LossStats.entropy``; 0 where the label is ignored, as TRL
    expects)."""
    opts = call.state.options
    shape = call.target_shape
    per_tok = -call.per_token.reshape(shape)
    mask = (call.stats.kept if opts.normalize == "kept" else call.stats.valid).reshape(shape)
    hit = call.stats.hit.reshape(shape)
    ent = call.stats.entropy.reshape(shape)
    if call.shift_labels is None:
        per_tok, mask, hit, ent = per_tok[..., :-1], mask[..., :-1], hit[..., :-1], ent[..., :-1]
    anchor = call.received if call.received is not None else per_tok
    _set_field(out, "log_probs", _tie(per_tok, anchor))
    _set_field(out, "label_mask", mask)
    _set_field(out, "is_top1", hit)
    _set_field(out, "entropy", ent)
