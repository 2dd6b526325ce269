"""Integrations with training libraries. Each submodule imports its library on first use only.

``hf``: Hugging Face transformers causal LMs (``patch_model``, ``unpatch_model``, ``patched``,
``set_objective``), usable with ``Trainer``, TRL's ``SFTTrainer``, accelerate and PEFT.
"""
