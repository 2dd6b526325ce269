"""Hugging Face transformers: one generic patch for every causal LM.

``patch_model(model, objective="neg_p")`` makes a causal LM's training forward (a call with
``labels``) compute ``fused_objectives.linear_objective_loss`` on the hidden states its output
embedding receives, and return ``logits=None``; without labels the forward is unchanged.

How it stays exact without a per-family copy of any forward: the patched forward runs the model's
*own* forward, so the decoder, everything the family does to the hidden states before its head,
``logits_to_keep``, caches and the MoE router auxiliary loss (added by the model itself, exactly as
unpatched) are untouched.  Two things change for the length of that call:

- the output embedding module (``model.get_output_embeddings()``) computes the fused loss inside
  its own call, where DeepSpeed ZeRO-3 / FSDP have gathered its weight, and returns a small probe
  tensor ``[..., 8]`` of known values instead of the ``[..., V]`` logits;
- ``model.loss_function`` (the public hook every causal LM calls with its logits and labels) returns
  that loss instead of the cross-entropy.

The loss function then checks what the forward did: the probe must have gone through exactly the
logit transform the config declares (Gemma-2/3 ``final_logit_softcapping``, RecurrentGemma
``logits_soft_cap``, Cohere ``logit_scale``,
Granite ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``), and the labels, ``shift_labels``,
``num_items_in_batch``, ``ignore_index`` and vocabulary size it receives must be the ones the fused
loss used.  Anything else (a forward that never calls its head or its ``loss_function``, changes the
labels, slices the vocabulary, applies an undeclared transform) raises ``UnsupportedModelError``
naming the model type and the reason: never a different number.

Importing this module does not import transformers; ``patch_model`` does, behind a version gate.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..functional import linear_objective_loss
from ..objectives import Objective, get_objective

__all__ = ["patch_model", "unpatch_model", "patched", "set_objective", "UnsupportedModelError",
           "MIN_TRANSFORMERS_VERSION"]

MIN_TRANSFORMERS_VERSION = "4.56.0"
_STATE = "_fused_objectives_patch"


class _Missing:
    """'Nothing was there' marker that stays itself through copy/deepcopy/pickle (patched models get copied)."""

    def __repr__(self):
        return "<missing>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
# Probe values the stand-in "logits" hold: they show which transform the forward applies after its head
_PROBE = (-30.0, -4.0, -1.0, 0.0, 0.5, 2.0, 7.0, 30.0)
_HALF = (torch.float16, torch.bfloat16)
_OPTION_DEFAULTS = dict(ignore_index=-100, normalize="valid", backend="auto", return_logits=False,
                        eval_objective=None, liger=False)
_NOT_OPTIONS = {
    "softcap": "it is read from the model config (final_logit_softcapping)",
    "logit_scale": "it is read from the model config (logit_scale, logits_scaling, lm_head_multiplier)",
    "reduction": "a Hugging Face loss is a mean over tokens (or sum / num_items_in_batch)",
    "num_items_in_batch": "it comes with each forward call (Trainer passes it for gradient accumulation)",
    "shift": "the patched forward applies Hugging Face's label shift (or uses shift_labels when given)",
    "return_stats": "per-token statistics are not part of a Hugging Face model output",
}


class UnsupportedModelError(RuntimeError):
    """The model's forward does something the generic fused path cannot reproduce exactly."""


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("fused_objectives.patch_model needs transformers >= "
                          f"{MIN_TRANSFORMERS_VERSION}: pip install 'fused_objectives[hf]'") from e
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(f"fused_objectives.patch_model needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
                          f"found {transformers.__version__}: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'")
    return transformers


# ----------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PatchOptions:
    """Loss options of a patch (the keyword names of ``linear_objective_loss`` where they exist).

    ``return_logits``: also build and return the logits on training calls (costs the ``[N, V]``
    memory the patch saves).  ``eval_objective``: objective used while ``model.training`` is False
    (None: the training objective).  ``liger``: apply Liger-Kernel's RMSNorm/RoPE/SwiGLU (CUDA).
    """

    objective: Objective
    ignore_index: int = -100
    normalize: str = "valid"
    backend: str = "auto"
    return_logits: bool = False
    eval_objective: Optional[Objective] = None
    liger: bool = False


def _make_options(objective, loss_options: dict) -> PatchOptions:
    for name in loss_options:
        if name in _NOT_OPTIONS:
            raise ValueError(f"patch_model() does not take {name}=: {_NOT_OPTIONS[name]}")
        if name not in _OPTION_DEFAULTS:
            raise TypeError(f"patch_model() got an unexpected loss option {name!r}; expected one of "
                            f"{sorted(_OPTION_DEFAULTS)}")
    opts = {**_OPTION_DEFAULTS, **loss_options}
    ii = opts["ignore_index"]
    if isinstance(ii, bool) or not isinstance(ii, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ii).__name__}")
    if opts["normalize"] not in ("valid", "kept"):
        raise ValueError(f"normalize must be 'valid' or 'kept', got {opts['normalize']!r}")
    if not isinstance(opts["backend"], str):
        raise TypeError(f"backend must be a string, got {type(opts['backend']).__name__}")
    for name in ("return_logits", "liger"):
        if not isinstance(opts[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(opts[name]).__name__}")
    ev = opts["eval_objective"]
    return PatchOptions(objective=get_objective(objective), ignore_index=int(ii), normalize=opts["normalize"],
                        backend=opts["backend"], return_logits=opts["return_logits"],
                        eval_objective=None if ev is None else get_objective(ev), liger=opts["liger"])


# ------------------------------------------------------------------------------------ patch state
class _PatchState:
    def __init__(self, options: PatchOptions, kind: str, saved_forward, original_func):
        self.options = options
        self.kind = kind                    # "instance" | "class"
        self.saved_forward = saved_forward  # what the instance / class __dict__ held under "forward"
        self.original_func = original_func  # unbound (class) or bound (instance) forward to run
        self.hooks = []
        self.trl_pending = False            # TRL's fused_lm_head protocol requested for the next call
        self.saved_call = _MISSING          # class patches: the class __dict__'s own __call__, if any
        self.labels_idx = _MISSING          # position of `labels` in the original forward's signature


def _class_state(cls) -> Optional[_PatchState]:
    for klass in cls.__mro__:
        state = klass.__dict__.get(_STATE)
        if state is not None:
            return state
    return None


def _state_of(model) -> Optional[_PatchState]:
    return model.__dict__.get(_STATE) or _class_state(type(model))


def _model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def _refuse(model, reason: str):
    raise UnsupportedModelError(
        f"fused_objectives cannot patch model type {_model_type(model)!r} ({type(model).__name__}): {reason}. "
        "The fused loss would not equal this model's own loss, so it is refused rather than computed "
        "differently; call fo.unpatch_model(model) to train it unpatched.")


# ----------------------------------------------------------------------------- logit transform
def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _logit_transform(model):
    """``(logit_scale, softcap)`` the config declares for the logits after the head."""
    tc = _text_config(model)
    scale = 1.0
    for name in ("logit_scale", "lm_head_multiplier"):
        value = getattr(tc, name, None)
        if value is not None and not isinstance(value, bool):
            scale *= float(value)
    value = getattr(tc, "logits_scaling", None)
    model_type = getattr(tc, "model_type", None)
    # Granite divides the logits by logits_scaling, HyperCLOVA X multiplies them; MiniCPM3 divides the hidden
    # states before its head (which the head's input already holds). The probe check catches any other use.
    if value is not None and model_type != "minicpm3":
        scale = scale * float(value) if model_type == "hyperclovax" else scale / float(value)
    softcap = getattr(tc, "final_logit_softcapping", None)
    if softcap is None:
        softcap = getattr(tc, "logits_soft_cap", None)  # RecurrentGemma
    return (None if scale == 1.0 else scale), (None if softcap is None else float(softcap))


def _apply_transform(z: torch.Tensor, scale, softcap) -> torch.Tensor:
    z = z.float()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


# ----------------------------------------------------------------------------------- head weight
def _is_plain_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


def _is_modules_to_save(module) -> bool:
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def _is_lora_linear(module) -> bool:
    return (type(module).__module__.startswith("peft.tuners.lora") and hasattr(module, "base_layer")
            and hasattr(module, "lora_A") and hasattr(module, "lora_B"))


def _active_of_modules_to_save(module):
    active = list(getattr(module, "active_adapters", []) or [])
    if module.disable_adapters or not active or active[0] not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[active[0]]


def _check_head(model, head, training: bool):
    """Raise unless ``head`` computes ``x @ W.T (+ b)`` in a way ``_head_params`` reproduces."""
    if head is None:
        _refuse(model, "get_output_embeddings() returns None, so there is no LM head to fuse")
    if _is_plain_linear(head):
        return
    if _is_modules_to_save(head):
        return _check_head(model, _active_of_modules_to_save(head), training)
    if _is_lora_linear(head):
        if not _is_plain_linear(head.base_layer):
            _refuse(model, f"its LoRA-wrapped head's base layer is {type(head.base_layer).__name__}, not nn.Linear")
        if head.disable_adapters and head.merged:
            _refuse(model, "its LoRA head is merged but adapters are disabled (PEFT would unmerge it in forward)")
        if head.disable_adapters or head.merged:
            return
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if name in getattr(head, "lora_variant", {}):
                _refuse(model, f"its LoRA head uses a variant ({type(head.lora_variant[name]).__name__}) for "
                               f"adapter {name!r}; only plain LoRA on the head is fused")
            drop = head.lora_dropout[name]
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and training:
                _refuse(model, f"its LoRA head applies dropout p={drop.p} to the input of adapter {name!r} "
                               "during training, which a single fused weight cannot express; use lora_dropout=0 "
                               "or leave lm_head out of target_modules")
            if not (_is_plain_linear(head.lora_A[name]) and _is_plain_linear(head.lora_B[name])):
                _refuse(model, f"its LoRA head's adapter {name!r} is not a pair of nn.Linear")
        return
    _refuse(model, f"its output embedding is {type(head).__module__}.{type(head).__qualname__}, not nn.Linear "
                   "(or a PEFT LoRA / modules_to_save wrapper of one)")


def _head_params(model, head):
    """``(weight [V, H], bias [V] | None)`` such that the head computes ``x @ weight.T (+ bias)``."""
    if _is_plain_linear(head):
        weight, bias = head.weight, head.bias
    elif _is_modules_to_save(head):
        weight, bias = _head_params(model, _active_of_modules_to_save(head))
        _refuse_sharded_wrapper(model, head)
    else:  # LoRA, validated by _check_head
        _refuse_sharded_wrapper(model, head)
        weight, bias = head.base_layer.weight, head.base_layer.bias
        if not (head.disable_adapters or head.merged):
            for name in head.active_adapters:
                if name not in head.lora_A:
                    continue
                a, b_, s = head.lora_A[name], head.lora_B[name], head.scaling[name]
                weight = weight + ((b_.weight @ a.weight) * s).to(weight.dtype)
                if b_.bias is not None:
                    lb = (b_.bias * s).to(weight.dtype)
                    bias = lb if bias is None else bias + lb
    if type(weight).__name__ == "DTensor":
        _refuse(model, "its LM head weight is a DTensor (tensor parallelism); the fused loss needs the full weight")
    return weight, bias


def _refuse_sharded_wrapper(model, head):
    # ZeRO-3 gathers a module's own parameters in its own call; a wrapper's inner weights are not gathered yet
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        _refuse(model, "its LM head is a PEFT wrapper under DeepSpeed ZeRO-3, whose inner weights are gathered "
                       "only inside the inner modules' calls; keep lm_head out of target_modules/modules_to_save")


# ------------------------------------------------------------------------------ autograd glue
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

    def __init__(self, model, state, objective, labels, shift_labels, num_items, trl, keep_given=False):
        self.model, self.state, self.objective = model, state, objective
        self.keep_given = keep_given
        self.labels, self.shift_labels, self.num_items, self.trl = labels, shift_labels, num_items, trl
        self.scale, self.softcap = _logit_transform(model)
        self.head_calls = self.loss_calls = 0
        self.head_done = False
        self.vocab = None
        self.loss = self.per_token = self.stats = self.target_shape = None
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
                      softcap=self.softcap, logit_scale=self.scale, backend=opts.backend)
        if self.trl:
            self.per_token, self.stats = linear_objective_loss(h2, w, target, b, reduction="none",
                                                               return_stats=True, **common)
            n = self.stats.n_kept if opts.normalize == "kept" else self.stats.n_valid
            denom = n if self.num_items is None else torch.as_tensor(self.num_items, device=n.device)
            denom = denom.to(torch.float32)
            self.loss = self.per_token.sum() / denom.clamp(min=1)
            source = self.per_token
        else:
            self.loss = linear_objective_loss(h2, w, target, b, num_items_in_batch=self.num_items, **common)
            source = self.loss
        if opts.return_logits:
            stand = original(x)
        else:
            probe = torch.tensor(_PROBE, dtype=out_dtype, device=x.device)
            stand = probe.expand(*x.shape[:-1], len(_PROBE))
        self.stand_in = stand
        self.head_done = True
        if torch.is_grad_enabled() and source.requires_grad:
            return _Tie.apply(stand, source)
        return stand

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
            _refuse(model, f"its loss is over vocab_size={vocab_size} but its LM head has {self.vocab} rows")
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != tuple(self.stand_in.shape):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            _refuse(model, f"its forward reshapes or slices the logits before its loss (head output "
                           f"{tuple(self.stand_in.shape)}, loss received {got})")
        expected = _apply_transform(self.stand_in.detach(), self.scale, self.softcap)
        half = self.stand_in.dtype in _HALF or logits.dtype in _HALF
        rtol, atol = (2e-2, 2e-2) if half else (1e-4, 1e-4)
        if not torch.allclose(logits.detach().float(), expected, rtol=rtol, atol=atol, equal_nan=True):
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
        if labels is None:
            return original(*args, **kwargs)
        opts = state.options
        objective = opts.eval_objective if (opts.eval_objective is not None and not model.training) else opts.objective
        head = model.get_output_embeddings()
        _check_head(model, head, model.training)
        keep = kwargs.get("logits_to_keep", 0)
        keep_given = isinstance(keep, torch.Tensor) or keep not in (0, None)
        call = _Call(model, state, objective, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"), trl,
                     keep_given)
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
        except Exception as e:
            if call.head_done and not call.loss_calls:
                _refuse(model, "its forward does not hand the head's logits to model.loss_function unchanged (it "
                               "computes its loss inline or reshapes the logits first; with the head's output it "
                               f"raised {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            raise
        if call.loss_calls != 1:
            _refuse(model, "its forward does not compute its loss through model.loss_function "
                           "(it computes the cross-entropy inline)")
        if not hasattr(out, "keys"):
            _refuse(model, f"its forward returns a {type(out).__name__}, not a ModelOutput, with return_dict=True")
        if not opts.return_logits:
            _set_field(out, "logits", None)
        if trl:
            _add_trl_fields(model, call, out)
        return out if return_dict else out.to_tuple()
    finally:
        _ACTIVE.depth -= 1


def _add_trl_fields(model, call, out):
    """TRL's ``fused_lm_head=True`` protocol: SFTTrainer reduces ``-log_probs`` over ``label_mask``.

    ``log_probs`` holds the negated per-token objective (exactly the log-probabilities for ``nll``), so
    TRL's loss is the objective; ``is_top1`` marks the tokens whose argmax is the target; ``entropy`` is NaN
    (not computed without logits)."""
    opts = call.state.options
    shape = call.target_shape
    per_tok = -call.per_token.reshape(shape)
    mask = (call.stats.kept if opts.normalize == "kept" else call.stats.valid).reshape(shape)
    hit = call.stats.hit.reshape(shape)
    if call.shift_labels is None:
        per_tok, mask, hit = per_tok[..., :-1], mask[..., :-1], hit[..., :-1]
    anchor = call.received if call.received is not None else per_tok
    _set_field(out, "log_probs", _tie(per_tok, anchor))
    _set_field(out, "label_mask", mask)
    _set_field(out, "is_top1", hit)
    _set_field(out, "entropy", torch.full(per_tok.shape, float("nan"), device=per_tok.device))


# --------------------------------------------------------------------------------- installation
def _make_forward(original_func, state, bound: bool):
    if bound:
        # the instance's state is looked up at call time, not closed over: a deep copy of the model carries a
        # copy of the state whose original forward is bound to the copy
        @functools.wraps(original_func)
        def forward(self, *args, **kwargs):
            own = self.__dict__[_STATE]
            return _run(self, own, own.original_func, args, kwargs)

        # inspect.signature(model.forward) (Trainer's column filter, generate's kwarg check) drops the first
        # parameter of a bound method: declare `self` before the wrapped bound forward's own parameters
        try:
            sig = inspect.signature(original_func)
            self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
        except (TypeError, ValueError):
            pass
    else:
        @functools.wraps(original_func)
        def forward(self, *args, **kwargs):
            return _run(self, state, original_func.__get__(self, type(self)), args, kwargs)
    forward.__fused_objectives_patch__ = state
    return forward


def _resolve(target):
    tf = _require_transformers()
    if isinstance(target, str):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if target not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            import difflib

            close = difflib.get_close_matches(target, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
            raise ValueError(f"unknown causal-LM model type {target!r}" + (f"; did you mean {close}?" if close else ""))
        return "class", getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[target]), None
    if isinstance(target, type):
        if not issubclass(target, tf.PreTrainedModel):
            raise TypeError(f"model_or_model_type must be a transformers PreTrainedModel, a subclass or a model "
                            f"type string; got class {target.__qualname__}")
        return "class", target, None
    if isinstance(target, torch.nn.Module):
        inner = target
        get_base = getattr(target, "get_base_model", None)
        if not isinstance(target, tf.PreTrainedModel) and callable(get_base):
            inner = get_base()  # PEFT
        if not isinstance(inner, tf.PreTrainedModel):
            raise TypeError(f"model_or_model_type must be a transformers PreTrainedModel (or a PEFT model around "
                            f"one); got {type(target).__qualname__}")
        return "instance", inner, target
    raise TypeError(f"model_or_model_type must be a model, a model class or a model type string; "
                    f"got {type(target).__name__}")


_ACTIVE = threading.local()  # depth of patched forwards running on this thread (decoder guard)


def _active_depth() -> int:
    return getattr(_ACTIVE, "depth", 0)


def _inner_model(module):
    get_base = getattr(module, "get_base_model", None)
    return module if hasattr(module, "get_output_embeddings") or not callable(get_base) else get_base()


def _trl_hook(module, args, kwargs):
    """TRL's SFTTrainer calls ``model(..., fused_lm_head=True)`` and reduces the per-token ``log_probs`` itself:
    take the flag off so the call reaches the patched forward, which answers with the objective."""
    state = _state_of(_inner_model(module)) if "fused_lm_head" in kwargs else None
    if state is None:
        return None
    kwargs = dict(kwargs)
    if kwargs.pop("fused_lm_head"):
        state.trl_pending = True
    return args, kwargs


def _decoder_guard(module, args):
    """A patched model's decoder running in training outside any patched forward means some code computes
    the training loss around the patch (its objective would silently not apply)."""
    if _active_depth() == 0 and module.training and torch.is_grad_enabled():
        cfg = getattr(module, "config", None)
        raise UnsupportedModelError(
            f"the decoder of a model patched by fused_objectives (model type "
            f"{getattr(cfg, 'model_type', type(module).__name__)!r}) ran in training outside the patched forward, "
            "so the training loss would not be the patched objective (for example a trainer computing its own loss "
            "from the hidden states); patch the outermost model (after get_peft_model), or unpatch it")


_trl_hook.__fused_objectives_hook__ = True
_decoder_guard.__fused_objectives_hook__ = True


def _hooked_modules(model, outer):
    try:
        decoder = model.get_decoder()
    except Exception:  # some families have no separable decoder; the guard is best effort
        decoder = None
    mods = {id(model): model, id(outer): outer}
    return list(mods.values()), (decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None)


def _install_hooks(model, outer, state):
    callers, decoder = _hooked_modules(model, outer)
    for m in callers:
        state.hooks.append(m.register_forward_pre_hook(_trl_hook, with_kwargs=True, prepend=True))
    if decoder is not None:
        state.hooks.append(decoder.register_forward_pre_hook(_decoder_guard))


def _remove_hooks(model, outer, state):
    for h in state.hooks:
        h.remove()
    # a deep copy of a patched model carries copies of the hooks that the original's handles do not reach
    callers, decoder = _hooked_modules(model, outer)
    for m in callers + ([decoder] if decoder is not None else []):
        for hooks in (m._forward_pre_hooks,):
            for key in [k for k, fn in hooks.items() if getattr(fn, "__fused_objectives_hook__", False)]:
                del hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)


def _make_class_call(cls, saved_call):
    """``__call__`` of a patched class: TRL's SFTTrainer replaces an instance's ``forward`` with its own fused
    head and calls ``model(..., fused_lm_head=True)``; take that flag off before any forward runs, so the call
    reaches the patched forward, which answers TRL's protocol with the objective (see ``_add_trl_fields``)."""

    def __call__(self, *args, **kwargs):
        if "fused_lm_head" in kwargs:
            kwargs = dict(kwargs)
            state = _state_of(self)
            if kwargs.pop("fused_lm_head") and state is not None:
                state.trl_pending = True
        if saved_call is not _MISSING:
            return saved_call(self, *args, **kwargs)
        return super(cls, self).__call__(*args, **kwargs)

    return __call__


def _apply_liger(kind, model_or_cls):
    model_type = model_or_cls.config.model_type if kind == "instance" else getattr(
        getattr(model_or_cls, "config_class", None), "model_type", None)
    if kind == "instance":
        device = next(model_or_cls.parameters()).device
        if device.type != "cuda":
            raise RuntimeError(f"liger=True needs the model on a CUDA device: Liger-Kernel's Triton kernels "
                               f"(RMSNorm, RoPE, SwiGLU) do not run on {device.type}; patch without liger=True")
    try:
        import liger_kernel.transformers as lk
    except ImportError as e:
        raise ImportError("liger=True needs liger-kernel: pip install liger-kernel") from e
    fn = getattr(lk, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        raise ValueError(f"liger=True: Liger-Kernel has no apply_liger_kernel_to_{model_type} for model type "
                         f"{model_type!r}")
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in dict(rope=True, rms_norm=True, swiglu=True, geglu=True, layer_norm=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False).items() if k in params}
    if kind == "instance" and "model" in params:
        kwargs["model"] = model_or_cls
    fn(**kwargs)


def patch_model(model_or_model_type, objective="neg_p", **loss_options):
    """Make a causal LM's training forward compute ``objective`` fused with its LM head.

    ``model_or_model_type``: a model instance (only that instance is patched; a PEFT model patches
    its base model), a model class or a model type string such as ``"llama"`` (every instance of
    that class, including future ones).  ``loss_options``: ``ignore_index`` (-100), ``normalize``
    (``"valid"``: Hugging Face's mean over valid tokens, or sum / ``num_items_in_batch``; ``"kept"``:
    the paper's mean over tokens passing the gate), ``backend``, ``return_logits`` (False),
    ``eval_objective`` (None) and ``liger`` (False).  Patching again replaces the options.

    A call with ``labels`` returns the fused loss (plus the model's own MoE auxiliary loss) and
    ``logits=None``; a call without labels is the original forward.  Returns the argument.
    """
    options = _make_options(objective, loss_options)
    kind, obj, outer = _resolve(model_or_model_type)
    if kind == "instance":
        _check_head(obj, obj.get_output_embeddings(), obj.training)
        scale, softcap = _logit_transform(obj)
        if softcap is not None and softcap <= 0:
            _refuse(obj, f"its config declares final_logit_softcapping={softcap}")
    if options.liger:
        _apply_liger(kind, obj)
    state = _own_state(kind, obj)
    if state is not None:
        state.options = options
        return model_or_model_type
    if kind == "class":
        saved = obj.__dict__.get("forward", _MISSING)
        state = _PatchState(options, "class", saved, None)
        inherited = _class_state(obj)
        # a subclass of a patched class patches the original forward, not the patched one
        state.original_func = inherited.original_func if inherited is not None and saved is _MISSING else obj.forward
        type.__setattr__(obj, "forward", _make_forward(state.original_func, state, bound=False))
        state.saved_call = obj.__dict__.get("__call__", _MISSING)
        type.__setattr__(obj, "__call__", _make_class_call(obj, state.saved_call))
        type.__setattr__(obj, _STATE, state)
    else:
        saved = obj.__dict__.get("forward", _MISSING)
        cls_state = _class_state(type(obj))
        if saved is not _MISSING:
            original = saved
        elif cls_state is not None:
            original = cls_state.original_func.__get__(obj, type(obj))
        else:
            original = type(obj).forward.__get__(obj, type(obj))
        state = _PatchState(options, "instance", saved, original)
        object.__setattr__(obj, "forward", types.MethodType(_make_forward(original, state, bound=True), obj))
        object.__setattr__(obj, _STATE, state)
        _install_hooks(obj, outer, state)
    return model_or_model_type


def _own_state(kind, obj) -> Optional[_PatchState]:
    return obj.__dict__.get(_STATE)


def unpatch_model(model_or_model_type):
    """Undo ``patch_model``: restore the instance's or class's original ``forward`` exactly.

    Returns the argument.  Raises ``ValueError`` when it is not patched.  (Liger-Kernel's module
    replacements from ``liger=True`` have no undo in Liger and stay.)"""
    kind, obj, outer = _resolve(model_or_model_type)
    state = _own_state(kind, obj)
    if state is None:
        what = "class" if kind == "class" else "instance"
        raise ValueError(f"{what} {getattr(obj, '__qualname__', type(obj).__qualname__)} is not patched by "
                         "fused_objectives" + ("; its class is (unpatch the class)" if kind == "instance"
                                                and _class_state(type(obj)) is not None else ""))
    if kind == "class":
        if state.saved_forward is _MISSING:
            type.__delattr__(obj, "forward")
        else:
            type.__setattr__(obj, "forward", state.saved_forward)
        if state.saved_call is _MISSING:
            type.__delattr__(obj, "__call__")
        else:
            type.__setattr__(obj, "__call__", state.saved_call)
        type.__delattr__(obj, _STATE)
    else:
        _remove_hooks(obj, outer, state)
        if state.saved_forward is _MISSING:
            obj.__dict__.pop("forward", None)
        else:
            object.__setattr__(obj, "forward", state.saved_forward)
        obj.__dict__.pop(_STATE, None)
    return model_or_model_type


def set_objective(model, objective, *, eval_objective: Any = _MISSING):
    """Change the objective of a patched model (or class, or model type) between steps; returns the model."""
    kind, obj, _ = _resolve(model)
    state = _own_state(kind, obj) if kind == "class" else _state_of(obj)
    if state is None:
        raise ValueError(f"set_objective: {getattr(obj, '__qualname__', type(obj).__qualname__)} is not patched; "
                         "call fo.patch_model first")
    new = replace(state.options, objective=get_objective(objective))
    if eval_objective is not _MISSING:
        new = replace(new, eval_objective=None if eval_objective is None else get_objective(eval_objective))
    state.options = new
    return model


@contextlib.contextmanager
def patched(model, objective="neg_p", **loss_options):
    """``with fo.patched(model, objective="nll_top:0.2"): ...``: patched inside, as before after."""
    kind, obj, _ = _resolve(model)
    before = _own_state(kind, obj)
    previous = before.options if before is not None else None
    patch_model(model, objective, **loss_options)
    try:
        yield model
    finally:
        if previous is None:
            unpatch_model(model)
        else:
            _own_state(kind, obj).options = previous
