"""Moved into ``fused-objectives bench``: this file only points there.

The CPU backend's record (``benchmarks/results/cpu_backend*.md``) was made by this script; what it
measured is now part of the one benchmark entry point: the three bare matmuls of the shape
(``bare_gemm``, always measured), wall and process CPU time of forward+backward (``cpu x gemm`` in
``--wide``, ``cpu_time_ms`` in ``--json``/``--csv``), ``--threads``, and peak RSS growth beyond the
gradients with each provider in a fresh process (``extra MB``).  The equivalent commands:

    .venv/bin/fused-objectives bench --hidden 1024 --vocab 32000 --tokens 4096 8192 --objective neg_p \\
        --provider fused reference torch_native --repeats 3 --max-seconds 120 --json cpu_time.json
    .venv/bin/fused-objectives bench --hidden 256 --vocab 128000 --tokens 4096 --objective neg_p \\
        --provider fused reference torch_native --repeats 1 --json cpu_memory.json
    .venv/bin/fused-objectives bench --render cpu_time.json --wide     # re-print a recorded run
"""
import sys

if __name__ == "__main__":
    print(__doc__)
    sys.exit(0)
