"""``fused-objectives bench``: the command-line front of the benchmark (see ``runner`` and ``report``)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Optional

HELP = "benchmark this engine against every alternative, checked against float64"

DESCRIPTION = """\
Measures this engine and every available alternative on the same inputs: forward, backward and
forward+backward time, peak memory, useful TFLOP/s and the ratio to three bare GEMMs of the same
shape. Each provider's loss, dX and dW are checked against a float64 reference first; a wrong
provider is reported as wrong, with no speed-up. With no argument: the small CPU preset on CPU,
llama3-8b at N=8192 on CUDA."""

EPILOG = """\
providers: fused (the backend 'auto' picks), fused-<backend> (forced), reference (eager, full fp32
logits), torch_native (F.linear_cross_entropy chunked, torch >= 2.13), torch_compile, liger, cce,
broken (self-test of the correctness gate; never a default). Unavailable ones are skipped with the reason.
examples:
  fused-objectives bench
  fused-objectives bench --preset llama3-8b --tokens 4096 8192 --dtype bf16 --objective nll neg_p \\
      --ignored-fraction 0 0.5 --json out.json --csv out.csv --plot out.png
  fused-objectives bench --objective nll --z-loss 1e-4 --label-smoothing 0.1   (against Liger's
      lse_square_scale / label_smoothing on CUDA; the float64 check includes both terms)"""


def _positive_int(flag: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
        return v
    return parse


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {v}")
    return v


def _term(name: str, upper: Optional[float] = None):
    """An argparse type for a loss-term coefficient, checked as ``linear_objective_loss`` checks it."""
    from ..options import _check_coefficient

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
        try:
            return _check_coefficient(name, v, upper)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))

    return parse


def _objective(s: str) -> str:
    import fused_objectives as fo
    try:
        return fo.get_objective(s).name
    except (ValueError, TypeError, KeyError) as exc:
        # str(KeyError) wraps its message in quotes; args[0] is the message itself
        raise argparse.ArgumentTypeError(str(exc.args[0]) if exc.args else str(exc))


def _provider(s: str) -> str:
    from .providers import all_providers
    if s not in all_providers():
        raise argparse.ArgumentTypeError(f"unknown provider {s!r}; expected one of "
                                         f"{', '.join(all_providers())}")
    return s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .inputs import DTYPES
    from .presets import PRESETS

    parser.description, parser.epilog = DESCRIPTION, EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    g = parser.add_argument_group("what to measure")
    g.add_argument("--preset", nargs="+", choices=list(PRESETS), metavar="NAME",
                   help="model shapes: " + ", ".join(f"{p.name} (H {p.hidden}, V {p.vocab}"
                                                      + (f", softcap {p.softcap:g}" if p.softcap else "") + ")"
                                                      for p in PRESETS.values()))
    g.add_argument("--tokens", nargs="+", type=_positive_int("--tokens"), metavar="N",
                   help="token counts (default: the preset's)")
    g.add_argument("--hidden", type=_positive_int("--hidden"), metavar="H", help="custom shape: hidden size")
    g.add_argument("--vocab", type=_positive_int("--vocab"), metavar="V", help="custom shape: vocabulary size")
    g.add_argument("--softcap", type=float, metavar="C", help="custom shape: logit soft-cap")
    g.add_argument("--objective", nargs="+", type=_objective, metavar="SPEC",
                   help="objective specs, e.g. nll neg_p power:10 nll_top:0.2 (default: neg_p on CPU, nll neg_p on CUDA)")
    g.add_argument("--z-loss", type=_term("z_loss"), default=0.0, metavar="Z",
                   help="add the z-loss Z * logsumexp(z)^2 per valid token (Liger: lse_square_scale); "
                        "a provider without it is skipped with the reason (default: 0)")
    g.add_argument("--label-smoothing", type=_term("label_smoothing", 1.0), default=0.0, metavar="EPS",
                   help="label smoothing EPS, as F.cross_entropy(label_smoothing=EPS) for nll (Liger computes "
                        "it for nll only; providers that cannot are skipped, with the reason) (default: 0)")
    g.add_argument("--class-weight", action="store_true",
                   help="seeded per-class weights in [0.5, 1.5], as F.cross_entropy(weight=...) for nll "
                        "(Liger: ce_weight; torch_native: weight)")
    g.add_argument("--provider", nargs="+", type=_provider, metavar="NAME",
                   help="providers to run (default: every available one)")
    g.add_argument("--dtype", choices=list(DTYPES), help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--ignored-fraction", nargs="+", type=_fraction, metavar="F", default=None,
                   help="share of every sequence that is an ignored prompt (default: 0)")
    g.add_argument("--pass", dest="passes", nargs="+", choices=["fwd", "bwd", "fwd_bwd"], metavar="PASS",
                   help="passes to report: fwd, bwd, fwd_bwd (default: all three; one loop measures them)")
    g.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    h = parser.add_argument_group("how")
    h.add_argument("--repeats", type=_positive_int("--repeats"), metavar="K",
                   help="timed steps per provider, median reported (default: 10 on CUDA, 3 on CPU)")
    h.add_argument("--warmup", type=int, metavar="W", help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    h.add_argument("--max-seconds", type=float, metavar="S",
                   help="stop a provider's timed steps once they took S seconds, after at least one "
                        "(default: 5 on CPU, none on CUDA); records carry the repeats done")
    h.add_argument("--check-tokens", type=_positive_int("--check-tokens"), metavar="N",
                   help="check only the first N tokens against float64 (default: every token)")
    h.add_argument("--in-process", action="store_true",
                   help="on CPU, run providers in this process (faster; peak RSS then less isolated)")
    h.add_argument("--threads", type=_positive_int("--threads"), metavar="K",
                   help="torch threads, here and in every provider's process (default: torch's)")
    h.add_argument("--seed", type=int, default=0)
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write {machine, records} JSON")
    o.add_argument("--csv", metavar="PATH", help="write CSV (machine as '# key: value' lines first)")
    o.add_argument("--plot", metavar="PATH", help="write a PNG: time and memory against tokens per provider")
    o.add_argument("--note", default="", help="free text stored in the machine header (e.g. 'shared CPU')")
    o.add_argument("--render", metavar="JSON",
                   help="measure nothing: print the report of a JSON written by --json (with --wide, --csv, --plot)")
    o.add_argument("--wide", action="store_true",
                   help="one row per (configuration, provider) with every pass, TFLOP/s and peak memory "
                        "(wider than 100 columns)")
    o.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress lines (also silences the one-line notice of a first C++ build)")


def build_plan(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import torch

    from .presets import DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESET, PRESETS
    from .providers import default_provider_names
    from .runner import Plan, Shape

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        parser.error(f"--device {device!r}: {exc}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:i], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    custom = args.hidden is not None or args.vocab is not None
    if custom and (args.hidden is None or args.vocab is None):
        parser.error("--hidden and --vocab go together (a custom shape needs both)")
    if custom and args.preset:
        parser.error("use --preset or --hidden/--vocab, not both")
    if args.softcap is not None and not custom:
        parser.error("--softcap applies to a custom shape (--hidden/--vocab); presets carry their own")
    if args.softcap is not None and not args.softcap > 0:
        parser.error(f"--softcap must be > 0, got {args.softcap}")
    shapes = []
    if custom:
        tokens = args.tokens or [1024]
        shapes = [Shape("custom", n, args.hidden, args.vocab, args.softcap) for n in tokens]
    else:
        names = args.preset or [DEFAULT_GPU_PRESET if dev.type == "cuda" else DEFAULT_CPU_PRESET]
        for name in names:
            p = PRESETS[name]
            tokens = args.tokens or (list(p.tokens) if args.preset or dev.type == "cpu" else [8192])
            shapes += [Shape(p.name, n, p.hidden, p.vocab, p.softcap) for n in tokens]
    cuda = dev.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if warmup < 0:
        parser.error(f"--warmup must be >= 0, got {warmup}")
    budget = args.max_seconds if args.max_seconds is not None else (None if cuda else 5.0)
    if budget is not None and not budget > 0:
        parser.error(f"--max-seconds must be > 0, got {budget}")
    return Plan(max_seconds=budget, shapes=shapes, objectives=args.objective or (["nll", "neg_p"] if cuda else ["neg_p"]),
                providers=args.provider or default_provider_names(dev),
                dtype=args.dtype or ("bf16" if cuda else "fp32"), device=str(dev),
                ignored_fractions=args.ignored_fraction or [0.0],
                passes=args.passes or ["fwd", "bwd", "fwd_bwd"], warmup=warmup,
                repeats=args.repeats or (10 if cuda else 3), check_tokens=args.check_tokens,
                isolate=not args.in_process, seed=args.seed, z_loss=args.z_loss,
                label_smoothing=args.label_smoothing, class_weight=args.class_weight)


class _Progress:
    """One line per provider run on stderr, with the time spent and an estimate of the time left
    (from the runs so far; providers skipped once are assumed skipped in later configurations)."""

    def __init__(self, plan, quiet: bool):
        self.quiet, self.done, self.total = quiet, 0, plan.units()
        self.providers = list(plan.providers)
        self.t0 = time.monotonic()
        self.measured, self.measured_s, self.skipped = 0, 0.0, set()
        self.last = self.t0

    def _eta(self) -> str:
        if not self.measured:
            return ""
        left_units = self.total - self.done
        per_config = len(self.providers)
        pos = self.done % per_config
        rest_here = [p for p in self.providers[pos:] if p not in self.skipped] if pos else []
        later = (left_units - (per_config - pos if pos else 0)) // per_config
        runs = len(rest_here) + later * sum(p not in self.skipped for p in self.providers)
        left = runs * self.measured_s / self.measured
        return f", ~{left:.0f}s left" if runs else ""

    def note(self, line: str):
        if not self.quiet:
            print(f"[{self.done}/{self.total} {time.monotonic() - self.t0:4.0f}s] {line}", file=sys.stderr, flush=True)

    def __call__(self, line: str):
        now = time.monotonic()
        name = line.split(": ", 1)[0].rsplit(" ", 1)[-1]
        self.done += 1
        if ": skipped (" in line:
            first = name not in self.skipped
            self.skipped.add(name)
            if not first:
                self.last = now
                return
        else:
            self.measured += 1
            self.measured_s += now - self.last
        self.last = now
        if not self.quiet:
            print(f"[{self.done}/{self.total} {now - self.t0:4.0f}s{self._eta()}] {line}", file=sys.stderr, flush=True)



def run(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    from . import report, runner

    parser = parser or argparse.ArgumentParser(prog="fused-objectives bench")
    if args.render:
        return _render(args, parser)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    plan = build_plan(args, parser)
    plan.threads = args.threads
    command = "fused-objectives " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
    machine = report.machine_info(plan.device, args.note, command.strip())
    if not args.quiet:
        print(f"fused-objectives bench: {plan.units()} measurements on {plan.device} "
              f"({machine.get('gpu') or machine.get('cpu')}), dtype {plan.dtype}, "
              f"{plan.repeats} repeats after {plan.warmup} warm-up"
              + (f", loss terms:{plan.terms_label()}" if plan.terms_label() else ""), file=sys.stderr, flush=True)
    if args.quiet:
        from ..cli import silence_progress

        silence_progress()  # also read by the worker processes and the C++ build notice
    progress = _Progress(plan, args.quiet)
    checkpoint = (lambda recs: report.write_json(args.json, machine, recs)) if args.json else None
    records = runner.run(plan, progress, checkpoint, note=progress.note)
    return _report(args, machine, records)


def _render(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    try:
        with open(args.render) as f:
            data = json.load(f)
        machine, records = data["machine"], data["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--render {args.render!r}: not a JSON written by 'fused-objectives bench --json' ({exc})")
    if args.json:
        parser.error("--render reads a JSON; --json would write one (use --csv or --plot)")
    return _report(args, machine, records)


def _report(args: argparse.Namespace, machine: dict, records: list) -> int:
    from . import report

    print(report.table(records, machine, wide=args.wide))
    written = []
    if args.json:
        report.write_json(args.json, machine, records)
        written.append(args.json)
    if args.csv:
        report.write_csv(args.csv, machine, records)
        written.append(args.csv)
    if args.plot:
        if report.write_plot(args.plot, machine, records):
            written.append(args.plot)
        else:
            print("--plot: matplotlib is not installed (pip install 'fused_objectives[bench]'); no plot written",
                  file=sys.stderr)
    if written:
        print("wrote " + ", ".join(written))
    wrong = sorted({r["provider"] for r in records if r["status"] in ("wrong", "error")})
    if wrong:
        print(f"not correct or failed: {', '.join(wrong)} (no speed-up reported for them)")
    return 0
