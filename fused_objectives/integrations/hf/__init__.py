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

Importing this package does not import transformers; ``patch_model`` does, behind a version gate.

Modules: ``patch`` (the public API and the installation of the patched forward), ``training_call``
(one patched training call: the fused loss inside the head's call, the checks in the loss function,
TRL's fields), ``head`` (the head's weight and bias; the config's logit transform), ``hooks`` (TRL's
flag, the decoder guard), ``options`` (patch options, version gate), ``state`` (what a patch keeps
on the model), ``refusals`` (``UnsupportedModelError``), ``trainers`` (Trainer / TRL settings that compute the
loss around the patch: refused or warned).
"""
from .options import MIN_TRANSFORMERS_VERSION, PatchOptions
from .patch import patch_model, patched, set_objective, unpatch_model
from .refusals import UnsupportedModelError

__all__ = ["patch_model", "unpatch_model", "patched", "set_objective", "UnsupportedModelError",
           "MIN_TRANSFORMERS_VERSION", "PatchOptions"]
