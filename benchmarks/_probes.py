"""The ``--probes`` option of the benchmark scripts: the tuning probes of tools/probes.py (forced Triton
paths, not part of the installed package) timed beside the user-facing rows, on a GPU."""

import os
import sys


def add_option(parser) -> None:
    parser.add_argument("--probes", action="store_true", help="also time the tuning probes of tools/probes.py")


def extra(op: str, args):
    """The ``extra`` factory of vlfast.bench.script for ``op`` where ``--probes`` was given, else None."""
    if not args.probes:
        return None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository root
    from tools.probes import EXTRA
    return EXTRA[op]
