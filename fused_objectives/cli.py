"""``fused-objectives``: the console command (also ``python -m fused_objectives``).

Subcommands live in their own modules and are imported only when used, so ``bench`` never imports
transformers.  A subcommand module exposes ``add_arguments(parser)`` and ``run(args)`` (``run`` may
take the parser as a second argument, for ``parser.error``) and returns an exit code; it is
registered in ``SUBCOMMANDS`` below with a one-line help shown by ``fused-objectives --help``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

# Read by every progress line of this package (and by the one-line notice of the CPU backend's
# first C++ build): set by --no-progress / --quiet, or by a user who wants silence everywhere.
QUIET_ENV = "FUSED_OBJECTIVES_QUIET"


def quiet() -> bool:
    """True when progress output is silenced (``FUSED_OBJECTIVES_QUIET`` set, not ``0``)."""
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def silence_progress() -> None:
    """``--no-progress``: silence this package's progress lines and the libraries' progress bars
    (transformers' and huggingface_hub's loading bars, datasets', any tqdm); call before loading models."""
    os.environ[QUIET_ENV] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    if "transformers" in sys.modules:  # the env var is read at import time only
        sys.modules["transformers"].utils.logging.disable_progress_bar()


class Status:
    """One line on stderr per step of a long command (``[  12s] loading the model ...``), so no
    command is silent for long; nothing when :func:`quiet`."""

    def __init__(self, prog: str):
        self.prog, self.t0 = prog, time.monotonic()

    def __call__(self, message: str) -> None:
        if not quiet():
            print(f"{self.prog} [{time.monotonic() - self.t0:4.0f}s] {message}", file=sys.stderr, flush=True)

# name -> (module, one-line help); the module is imported only when its subcommand runs
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "bench": ("fused_objectives.bench.command",
              "benchmark this engine against every alternative, checked against float64"),
    "probe": ("fused_objectives.probe",
              "measure where a (model, dataset) pair sits on the capability continuum"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-objectives",
        description="Fused LM-head SFT objectives (arXiv 2510.00526): tools.",
        epilog="subcommands:\n" + "\n".join(f"  {n:<8} {h}" for n, (_, h) in SUBCOMMANDS.items())
               + "\n\n'fused-objectives SUBCOMMAND --help' for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("subcommand", choices=list(SUBCOMMANDS), metavar="SUBCOMMAND",
                        help=f"one of: {', '.join(SUBCOMMANDS)}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name = top.parse_args(argv[:1]).subcommand
    module_name, help_line = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            top.error(f"subcommand {name!r} is not available in this installation: module {module_name} "
                      f"is missing")
        raise
    parser = argparse.ArgumentParser(prog=f"fused-objectives {name}", description=help_line)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.argv = argv
    run = module.run
    takes_parser = len(inspect.signature(run).parameters) >= 2
    code = run(args, parser) if takes_parser else run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
