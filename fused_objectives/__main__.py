"""``python -m fused_objectives SUBCOMMAND ...``: the same as the ``fused-objectives`` console command."""
import sys

from .cli import main

sys.exit(main())
