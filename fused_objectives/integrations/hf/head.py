"""The LM head: which weight and bias it applies (plain, LoRA, modules_to_save) and the logit transform
the config declares after it (scale, soft-cap)."""
from __future__ import annotations


import torch

from .refusals import _refuse


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
    if type(weight).__name__ == "DTensor" and not _is_plain_linear(head):
        # a vocabulary-sharded nn.Linear head (ColwiseParallel) is fused shard by shard (parallel.py)
        _refuse(model, "its LM head is a PEFT wrapper around a DTensor (tensor-parallel) weight; only a plain "
                       "nn.Linear head can be vocabulary-parallel")
    return weight, bias


def _refuse_sharded_wrapper(model, head):
    # ZeRO-3 gathers a module's own parameters in its own call; a wrapper's inner weights are not gathered yet
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        _refuse(model, "its LM head is a PEFT wrapper under DeepSpeed ZeRO-3, whose inner weights are gathered "
                       "only inside the inner modules' calls; keep lm_head out of target_modules/modules_to_save")
