"""Capability probe: where does a (model, dataset) pair sit on the model-capability continuum?

arXiv 2510.00526 places a pair by the base model's **mean probability of the reference tokens**
(teacher forcing, response tokens and EOS only): math ~0.76-0.81 (prior-leaning objectives such as
``neg_p`` and ``nll_top:0.2`` beat NLL), medical ~0.5 (no clear winner), figfont ~0.01 (NLL wins).
:func:`probe` measures it with a forward pass only: the model's decoder gives the final hidden
states and :func:`fused_objectives.target_logprob` the per-token ``log p`` of the reference tokens,
so the ``[tokens, vocab]`` logits are never materialised on GPU (on CPU the reference backend holds
one bounded ``[chunk, vocab]`` block at a time).

The paper states no selection rule: the recommendation here is a heuristic with explicit
cut-points (:data:`DEFAULT_CUT_POINTS`), always reported with the statistics it was based on.

Python API: :func:`probe` (plus :func:`load_records`, :func:`encode_records`, :func:`make_batches`
to turn JSON Lines or a saved ``datasets`` dataset into batches).  Command line:
``fused-objectives probe`` (:func:`add_arguments` and :func:`run`).  This package imports neither
transformers, datasets, matplotlib nor tqdm until they are needed.

Modules: ``continuum`` (the paper's anchors, cut-points, recommendation), ``model`` (decoder + fused
head -> log-probabilities: :func:`probe`), ``result`` (statistics, report, JSON, plot), ``data``
(records -> token ids -> batches), ``cli`` (``fused-objectives probe``).
"""
from ..functional import target_logprob  # noqa: F401  (the function the measurement calls)
from .cli import add_arguments, main, run
from .continuum import ANCHORS, DEFAULT_CUT_POINTS, Anchor, recommend
from .data import IGNORE_INDEX, Encoded, encode_records, load_records, make_batches
from .model import _route, probe
from .result import PERCENTILES, ProbeResult

__all__ = [
    "probe", "ProbeResult", "recommend", "ANCHORS", "DEFAULT_CUT_POINTS", "PERCENTILES",
    "load_records", "encode_records", "make_batches", "add_arguments", "run", "main",
]
