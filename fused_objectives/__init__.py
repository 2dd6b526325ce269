"""fused_objectives: SFT objectives of the target-token probability (NLL, -p, -p^10, thresholded
variants, your own), fused with the LM-head projection so the [tokens, vocab] logits never exist.

Importing this package imports neither Triton nor transformers; both load on first use.
"""
from .backends import available_backends, register_backend
from .functional import LossStats, linear_objective_loss, target_logprob
from .integrations.hf import patch_model, patched, set_objective, unpatch_model  # imports transformers lazily
from .module import LinearObjectiveLoss
from .objectives import Objective, get_objective, list_objectives, register_objective
from .options import LogitOptions
# light module (torch only): transformers, datasets, matplotlib and tqdm load inside its functions
from .probe import ProbeResult, probe

__version__ = "0.1.0"

__all__ = [
    "linear_objective_loss",
    "target_logprob",
    "LinearObjectiveLoss",
    "LossStats",
    "Objective",
    "get_objective",
    "register_objective",
    "list_objectives",
    "LogitOptions",
    "available_backends",
    "register_backend",
    "probe",
    "ProbeResult",
    "patch_model",
    "unpatch_model",
    "patched",
    "set_objective",
]
