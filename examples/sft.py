"""Supervised fine-tuning with `transformers.Trainer` and a fused probability-based objective.

`fo.patch_model(model, objective=...)` makes the model's training forward compute the objective
fused with its LM head (no [tokens, vocab] logits); everything else is a stock Trainer run with the
paper's recipe (AdamW 0.9/0.95, cosine schedule, 10% warmup, gradient clipping 1.0; prompt tokens
masked, EOS scored).  `--probe` first measures the base model's mean probability of the reference
tokens (`fo.probe`, forward only) and picks the objective from its heuristic recommendation.

    # CPU, nothing downloaded: a tiny random model, tokenizer and dataset are created locally
    python examples/sft.py --tiny --probe --max-steps 20

    # a real model on a GPU (JSON Lines with prompt/response, or --messages-field messages)
    python examples/sft.py --model Qwen/Qwen2.5-Math-1.5B --data train.jsonl --probe \\
        --max-length 3072 --batch-size 4 --grad-accum 64 --lr 5e-5 --bf16 --gradient-checkpointing
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch

import fused_objectives as fo

P = sys.modules["fused_objectives.probe"]  # data helpers shared with the probe: same token layout


class SFTData(torch.utils.data.Dataset):
    def __init__(self, encoded):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        e = self.encoded[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


def collate(pad_id):
    def fn(examples):
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            mask[r, :n] = 1
            labels[r, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn


def load_model_and_data(args):
    """(model, tokenizer, records) from --model/--data, or a tiny local setup with --tiny."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.tiny:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import make_tiny

        tokenizer = make_tiny.make_tokenizer()
        model = make_tiny.make_model(tokenizer, hidden=args.tiny_hidden, layers=2)
        if args.data is None:
            records = [(f"tiny example {i}", r) for i, r in enumerate(make_tiny.make_records(args.tiny_examples))]
            return model, tokenizer, records
    else:
        if args.model is None:
            raise SystemExit("pass --model PATH_OR_NAME (or --tiny for a local tiny model)")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.data is None:
        raise SystemExit("pass --data FILE (JSON Lines or a saved datasets directory)")
    return model, tokenizer, P.load_records(args.data, limit=args.limit)


def choose_objective(args, model, tokenizer, encoded, pad_id):
    if not args.probe:
        return args.objective, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    batches = P.make_batches(encoded[: args.probe_limit], args.batch_size, pad_id)
    result = fo.probe(model, batches, progress=not args.quiet)
    result.examples = min(len(encoded), args.probe_limit)
    print(result.report())
    objective = result.recommendation["objective"]
    print(f"--probe: training with {objective!r} (heuristic recommendation; --objective {args.objective!r} ignored)")
    return objective, result


def training_arguments(args, output_dir):
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
              gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, num_train_epochs=args.epochs,
              max_steps=args.max_steps, lr_scheduler_type="cosine", adam_beta1=0.9, adam_beta2=0.95,
              weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.logging_steps, save_strategy="no",
              report_to="none", remove_unused_columns=False, bf16=args.bf16, seed=args.seed,
              disable_tqdm=args.quiet, use_cpu=not torch.cuda.is_available())
    if args.gradient_checkpointing:
        kw["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    # the paper's 10% warmup: warmup_ratio before transformers 5, a float warmup_steps since
    kw.update({"warmup_ratio": 0.1} if "warmup_ratio" in names else {"warmup_steps": 0.1})
    return TrainingArguments(**{k: v for k, v in kw.items() if k in names})


def objective_spec(spec):
    """--objective: a clear one-line error for a bad spec, before anything is loaded."""
    try:
        fo.get_objective(spec)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="model directory or Hugging Face name (causal LM)")
    parser.add_argument("--data", help="JSON Lines or saved datasets directory (prompt/response or messages)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model, tokenizer and data built locally")
    parser.add_argument("--objective", default="nll", type=objective_spec,
                        help="objective spec, e.g. nll, neg_p, nll_top:0.2, power:10")
    parser.add_argument("--probe", action="store_true",
                        help="choose the objective from fo.probe's heuristic recommendation")
    parser.add_argument("--probe-limit", type=positive_int, default=1000,
                        help="examples the probe looks at (default 1000)")
    parser.add_argument("--normalize", default="valid", choices=("valid", "kept"),
                        help="mean over valid tokens (HF) or over tokens kept by the gate (the paper)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                        help="label smoothing in the fused loss (not TrainingArguments.label_smoothing_factor, "
                             "which would bypass the patch and is refused)")
    parser.add_argument("--z-loss", type=float, default=0.0, metavar="Z", help="add Z * logsumexp(z)^2 per token")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--messages-field", default=None, help="conversation field: chat template, assistant turns")
    parser.add_argument("--max-length", type=positive_int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="use only the first K examples")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--grad-accum", type=positive_int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="default 5e-5 (1e-3 with --tiny)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output-dir", default=None, help="where to save the fine-tuned model (default: not saved)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the run's summary as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--tiny-hidden", type=positive_int, default=64)
    parser.add_argument("--tiny-examples", type=positive_int, default=64)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.tiny else 5e-5

    from transformers import Trainer

    torch.manual_seed(args.seed)
    model, tokenizer, records = load_model_and_data(args)
    encoded = P.encode_records(tokenizer, records, prompt_field=args.prompt_field,
                               response_field=args.response_field, messages_field=args.messages_field,
                               max_length=args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective, probe_result = choose_objective(args, model, tokenizer, encoded, pad_id)
    fo.get_objective(objective)  # a clear error for a bad spec before any training

    fo.patch_model(model, objective=objective, normalize=args.normalize, label_smoothing=args.label_smoothing,
                   z_loss=args.z_loss)
    if args.normalize == "kept":
        # the paper's mean over kept tokens is per micro-batch: Trainer must not pass num_items_in_batch
        model.accepts_loss_kwargs = False
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(model=model, args=training_arguments(args, args.output_dir or scratch),
                          train_dataset=SFTData(encoded), data_collator=collate(pad_id))
        result = trainer.train()
        if args.output_dir:
            fo.unpatch_model(model)
            trainer.save_model(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"objective": objective, "chosen_by_probe": bool(args.probe), "steps": trainer.state.global_step,
               "examples": len(encoded), "train_loss": result.training_loss, "logged_losses": losses,
               "probe": probe_result.to_dict() if probe_result is not None else None}
    print(f"trained {summary['steps']} steps with objective {objective!r}: mean train loss {result.training_loss:.4f}"
          + (f"; saved to {args.output_dir}" if args.output_dir else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    # bad arguments or data: one line, no traceback
    try:
        main()
    except (ValueError, TypeError, OSError, fo.integrations.hf.UnsupportedModelError) as exc:
        raise SystemExit(f"{sys.argv[0]}: error: {exc}") from None
