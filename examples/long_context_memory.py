"""Peak memory of one forward + backward against sequence length: unpatched vs `fo.patch_model`.

The unpatched Hugging Face loss materialises the [tokens, vocab] logits, an fp32 copy and its
gradient; the patched model computes the same loss fused with the LM head, so at long context the
LM head stops dominating memory.  Measured with CUDA's allocator statistics on a GPU (peak
allocated minus the memory held before the step) and with the process's peak resident set size on
CPU (one fresh process per variant, lengths in increasing order, minus the RSS after building the
model).  The losses of both variants are compared at every length: a row whose losses disagree is
marked and not counted as a saving.

    python examples/long_context_memory.py                        # tiny Llama, vocab 32000, CPU or GPU
    python examples/long_context_memory.py --model meta-llama/Llama-3.2-1B --bf16 \\
        --gradient-checkpointing --lengths 4096 8192 16384 32768  # a real model on a GPU
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import fused_objectives as fo

VARIANTS = ("unpatched", "patched")


def build_model(args):
    import transformers

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                       num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=False,
                                       max_position_embeddings=max(args.lengths))
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(args.device).train()


def step(model, length, device, seed=0):
    """One forward + backward on random tokens; returns (loss, seconds)."""
    g = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(device)
    labels = ids.clone()
    labels[:, : length // 4] = -100  # a prompt
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    value = float(loss.detach())
    del loss
    model.zero_grad(set_to_none=True)
    return value, seconds


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_variant(args, variant):
    """Rows for one variant: peak memory (bytes over the state before the step), seconds, loss."""
    model = build_model(args)
    if variant == "patched":
        fo.patch_model(model, objective=args.objective)
    cuda = args.device.startswith("cuda")
    step(model, 16, args.device)  # warm-up: one-time library initialisation stays out of the timings
    base_rss = None if cuda else _rss_bytes()
    rows = []
    for length in sorted(args.lengths):
        row = {"variant": variant, "length": length}
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            row["loss"], row["seconds"] = step(model, length, args.device)
            if cuda:
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - before
            else:
                # ru_maxrss (KiB on Linux) only grows: lengths run in increasing order, so it is this step's peak
                row["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _worker_args(args, variant):
    argv = [sys.executable, os.path.abspath(__file__), "--_worker", variant, "--device", args.device,
            "--objective", args.objective, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--lengths", *map(str, args.lengths)]
    if args.model:
        argv += ["--model", args.model]
    if args.bf16:
        argv.append("--bf16")
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv


def measure(args):
    if args.device.startswith("cuda"):
        return [r for v in VARIANTS for r in measure_variant(args, v)]
    rows = []
    for variant in VARIANTS:  # a fresh process each: peak RSS cannot be reset within one
        proc = subprocess.run(_worker_args(args, variant), capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("ROWS ")]
        if proc.returncode != 0 or not lines:
            reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip()[-2000:]
            raise SystemExit(f"{variant} measurement failed with exit code {proc.returncode}: {reason}")
        rows += json.loads(lines[-1][5:])
    return rows


def table(rows, args):
    by = {(r["variant"], r["length"]): r for r in rows}
    unit = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS increase"
    out = [f"peak memory of forward + backward ({unit}, MiB), objective {args.objective!r} when patched",
           f"{'length':>8} | {'unpatched':>10} | {'patched':>10} | {'saved':>7} | {'s unpatched':>11} | "
           f"{'s patched':>9} | losses"]
    for length in sorted(args.lengths):
        u, p = by[("unpatched", length)], by[("patched", length)]
        if "error" in u or "error" in p:
            cells = [u.get("error") or f"{u['peak_bytes'] / 2**20:.0f}", p.get("error") or f"{p['peak_bytes'] / 2**20:.0f}"]
            out.append(f"{length:>8} | {cells[0]:>10} | {cells[1]:>10} | {'-':>7} | {'-':>11} | {'-':>9} | -")
            continue
        # the patched objective is compared with the unpatched NLL only when it is NLL
        same = args.objective != "nll" or abs(u["loss"] - p["loss"]) <= 1e-3 * max(1.0, abs(u["loss"]))
        check = "match" if args.objective == "nll" and same else ("MISMATCH" if not same else "n/a")
        saved = f"{1 - p['peak_bytes'] / u['peak_bytes']:.0%}" if same and u["peak_bytes"] > 0 else "-"
        out.append(f"{length:>8} | {u['peak_bytes'] / 2**20:10.0f} | {p['peak_bytes'] / 2**20:10.0f} | {saved:>7} | "
                   f"{u['seconds']:11.2f} | {p['seconds']:9.2f} | {check}")
    return "\n".join(out)


def plot(rows, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, style in zip(VARIANTS, ("o-", "s-")):
        pts = sorted((r["length"], r["peak_bytes"] / 2**20) for r in rows if r["variant"] == variant and "peak_bytes" in r)
        if pts:
            ax.plot(*zip(*pts), style, label=variant if variant == "unpatched" else f"patched ({args.objective})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(args.lengths), [str(n) for n in sorted(args.lengths)])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory, MiB" + (" (CUDA allocated)" if args.device.startswith("cuda") else " (RSS increase)"))
    name = args.model or f"tiny Llama (H={args.hidden}, V={args.vocab}, {args.layers} layers)"
    ax.set_title(f"forward + backward memory: {name}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default=None, help="model directory or name (default: a tiny random Llama)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 512..4096 on CPU, 1024..16384 on GPU)")
    parser.add_argument("--objective", default="nll", help="objective of the patched model (default nll)")
    parser.add_argument("--vocab", type=int, default=32000, help="tiny model: vocabulary size")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny model: layers")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default="long_context_memory.png", help="PNG chart path")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = [1024, 2048, 4096, 8192, 16384] if args.device.startswith("cuda") else [512, 1024, 2048, 4096]
    if args._worker:
        print("ROWS " + json.dumps(measure_variant(args, args._worker)), flush=True)
        return None
    rows = measure(args)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "torch": torch.__version__, "objective": args.objective, "rows": rows}, f, indent=2)
    if args.plot:
        print(f"wrote {plot(rows, args, args.plot)}")
    return rows


if __name__ == "__main__":
    # bad arguments or data: one line, no traceback
    try:
        main()
    except (ValueError, TypeError, OSError, fo.integrations.hf.UnsupportedModelError) as exc:
        raise SystemExit(f"{sys.argv[0]}: error: {exc}") from None
