"""Microbenchmark of the fused objectives against the alternatives users would pick instead.

``fused-objectives bench`` (or ``python -m fused_objectives bench``) measures, in one run and on the
same inputs, this engine and every available alternative (eager reference, PyTorch's chunked
``F.linear_cross_entropy``, ``torch.compile``, Liger-Kernel, Apple's Cut Cross-Entropy), checks each
against a float64 ground truth and refuses to report a speed-up for a wrong result.

Modules: ``presets`` (model shapes), ``providers`` (the implementations), ``inputs`` (inputs and
ground truth), ``measure`` (timing, memory, correctness of one provider), ``runner`` (the sweep),
``report`` (table, JSON, CSV, plots), ``command`` (the CLI subcommand), ``_worker`` (a fresh process
per CPU measurement).  Importing this package imports neither transformers nor Liger.
"""
from .presets import PRESETS, Preset

__all__ = ["PRESETS", "Preset"]
