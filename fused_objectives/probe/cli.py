"""``fused-objectives probe``: the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from .continuum import DEFAULT_CUT_POINTS
from .data import encode_records, load_records, make_batches
from .model import probe

_DESCRIPTION = ("Measure where a (model, dataset) pair sits on the capability continuum of arXiv 2510.00526: "
                "the base model's mean probability of the reference response tokens, and the objective it suggests.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``probe`` subcommand's arguments to ``parser``."""
    parser.add_argument("--model", required=True, help="model directory or Hugging Face name (causal LM)")
    parser.add_argument("--data", required=True,
                        help="JSON Lines file, or a directory saved with datasets' save_to_disk")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or name (default: --model)")
    parser.add_argument("--prompt-field", default="prompt", help="prompt field (default: prompt)")
    parser.add_argument("--response-field", default="response", help="response field (default: response)")
    parser.add_argument("--messages-field", default=None,
                        help="conversation field (list of {role, content}); renders it with the chat template "
                             "and scores the assistant turns, instead of the prompt/response fields")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    parser.add_argument("--max-length", type=int, default=4096, help="truncate sequences to N tokens (default 4096)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="probe only the first K examples")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG histogram and continuum chart")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: the checkpoint's dtype on GPU, float32 on CPU)")
    parser.add_argument("--cut-points", type=float, nargs=2, default=list(DEFAULT_CUT_POINTS),
                        metavar=("LOW", "HIGH"),
                        help="heuristic cut-points on mean p: <= LOW recommends nll, >= HIGH neg_p "
                             f"(default {DEFAULT_CUT_POINTS[0]:g} {DEFAULT_CUT_POINTS[1]:g})")
    parser.add_argument("--backend", default="auto", help="fused_objectives backend (auto, triton, cpu, reference)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (transformers)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (this command's lines and bars, and transformers' loading bars)")
    return parser


def _looks_like_path(source: str) -> bool:
    # a Hub id is "name" or "org/name"; anything else (absolute, ./, ~, deeper) can only be a path
    return (os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
            or os.sep != "/" and os.sep in source)


def _check_source(flag: str, source: str) -> None:
    """A local path that does not exist is reported as such, not as a failed Hub download."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {source!r} is a file; expected a model directory (config.json, weights, "
                             f"tokenizer files) or a Hugging Face model name")
    elif _looks_like_path(source):
        raise ValueError(f"{flag} {source!r}: no such directory")


def _load_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a missing tokenizer
        if not os.path.exists(os.path.expanduser(source)):
            raise ValueError(f"{source!r} is neither a local directory (no such path) nor a model that could be "
                             f"loaded from the Hugging Face Hub ({type(e).__name__}: {_first_line(e)})") from None
        raise ValueError(f"could not load a tokenizer from {source!r} ({type(e).__name__}: {e}); the probe needs "
                         f"the model's tokenizer: save it with the model or pass --tokenizer PATH") from None
    if isinstance(tok, bool) or not callable(tok):
        raise ValueError(f"{source!r} gave no usable tokenizer ({type(tok).__name__})")
    return tok


def _load_model(source: str, device: str, dtype: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = "auto" if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"could not load a causal LM from {source!r} ({type(e).__name__}: {e})") from None
    return model.to(device)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def run(args: argparse.Namespace) -> int:
    """Run ``fused-objectives probe``: print the report, optionally write JSON and a PNG; 0 on success,
    2 on bad input (the message names the file, line or field)."""
    try:
        return _run(args)
    except ValueError as e:
        print(f"fused-objectives probe: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    for name in ("max_length", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from ..cli import Status, silence_progress

    if args.no_progress:
        silence_progress()
    status = Status("probe")
    _check_source("--model", args.model)
    if args.tokenizer:
        _check_source("--tokenizer", args.tokenizer)
    status(f"loading the tokenizer from {args.tokenizer or args.model} (and transformers) ...")
    tokenizer = _load_tokenizer(args.tokenizer or args.model, args.trust_remote_code)
    records = load_records(args.data, split=args.split, limit=args.limit)
    status(f"read {len(records)} examples from {args.data}; tokenizing ...")
    encoded = encode_records(tokenizer, records, prompt_field=args.prompt_field, response_field=args.response_field,
                             messages_field=args.messages_field, max_length=args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = make_batches(encoded, args.batch_size, pad if pad is not None else 0)
    status(f"loading the model from {args.model} ...")
    model = _load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    status(f"scoring {sum(len(e.input_ids) for e in encoded)} tokens in {len(batches)} batches "
           f"(forward passes only) ...")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None:
        for e in encoded:
            lo, hi = min(e.input_ids), max(e.input_ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{e.where}: token id {hi if hi >= vocab else lo} is outside the model's "
                                 f"vocabulary [0, {vocab}): the tokenizer and the model do not match")
    result = probe(model, batches, cut_points=args.cut_points, progress=not args.no_progress, backend=args.backend)
    result.examples = len(encoded)
    result.info.update({
        "model": args.model, "data": args.data, "max_length": args.max_length,
        "truncated": sum(e.truncated for e in encoded),
        "mode": "messages" if args.messages_field else "prompt/response",
        "device": str(next(model.parameters()).device), "backend": args.backend,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    })
    status("done")
    print(result.report())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fused-objectives probe`` as a function (the console script's subcommand calls :func:`run`)."""
    parser = add_arguments(argparse.ArgumentParser(prog="fused-objectives probe", description=_DESCRIPTION))
    return run(parser.parse_args(argv))
