"""python -m stepdistill.evaluate {evaluate,fid-stats} ... (same as the stepdistill subcommands)."""
import sys

from .cli import main

sys.exit(main())
