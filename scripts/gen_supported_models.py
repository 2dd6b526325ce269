"""Regenerate docs/supported_models.md: run fused_objectives' Hugging Face family checks (the ones
tests/test_hf_families.py runs) on every causal-LM model type of the installed transformers.

    .venv/bin/python scripts/gen_supported_models.py            # writes docs/supported_models.md
    .venv/bin/python scripts/gen_supported_models.py --check    # exit 1 if the file is out of date
"""
import argparse
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "supported_models.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC)
    parser.add_argument("--check", action="store_true", help="only compare with the existing file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    from fused_objectives.integrations.hf_verify import check_all, markdown_table

    from fused_objectives.integrations.hf_verify import causal_lm_types

    torch.set_num_threads(1)
    total, t0, done = len(causal_lm_types()), time.monotonic(), [0]

    def log(line):  # one line per family, with the time left (the whole run takes minutes)
        done[0] += 1
        left = (time.monotonic() - t0) / done[0] * (total - done[0])
        print(f"[{done[0]}/{total}, ~{left:.0f}s left] {line}", file=sys.stderr, flush=True)

    results = check_all(log=None if args.quiet else log)
    text = markdown_table(results, transformers.__version__)
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print("up to date" if same else f"{args.out} is out of date: rerun scripts/gen_supported_models.py")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    counts = {s: sum(r.status == s for r in results) for s in ("exact", "refused", "skipped", "FAILED")}
    print(f"wrote {args.out}: {counts}")
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
