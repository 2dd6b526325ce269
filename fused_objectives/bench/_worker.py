"""One provider on one configuration in a fresh process (CPU memory must not see other providers).

Usage (by the runner): ``python -m fused_objectives.bench._worker SPEC.json OUT.json``; the
ground truth arrives as a ``torch.save`` file named in the spec.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    from .inputs import DTYPES, Result, make_inputs
    from .measure import measure
    from .providers import get_provider
    from .runner import Plan

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    gt = Result(**torch.load(spec["gt_path"], map_location="cpu"))
    inp = make_inputs(spec["tokens"], spec["hidden"], spec["vocab"], DTYPES[spec["dtype"]], spec["device"],
                      spec["ignored_fraction"], spec["seed"])
    plan = Plan(shapes=[], objectives=[], providers=[], dtype=spec["dtype"], device=spec["device"], seed=spec["seed"],
                z_loss=spec.get("z_loss", 0.0), label_smoothing=spec.get("label_smoothing", 0.0),
                class_weight=spec.get("class_weight", False))
    problem = plan.problem(spec["objective"], spec["softcap"], spec["vocab"], spec["device"])
    m = measure(get_provider(spec["provider"]), problem, inp,
                inp.head(spec["check_tokens"]), gt, spec["tolerance"], spec["warmup"], spec["repeats"],
                spec.get("max_seconds"))
    with open(out_path, "w") as f:
        json.dump(dataclasses.asdict(m), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
