"""GroupNorm + time embedding (+ scale-shift) + SiLU vs eager PyTorch and torch.compile; prints a table, writes JSON.

    python benchmarks/bench_group_norm.py [--device cuda] [--probes]
        [--json benchmarks/results/<card>-<date>/group_norm.json]

``--probes`` adds the tuning probes of tools/probes.py (forced Triton paths) on a GPU.
"""

import os
import sys

from vlfast import bench as vb


def probes(op):
    """The ``extra`` factory of tools/probes.py for ``op`` (the repository's tools are not installed)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools.probes import EXTRA
    return EXTRA[op]


def main():
    p = vb.parser(__doc__)
    p.add_argument("--probes", action="store_true", help="also time the tuning probes of tools/probes.py")
    args = p.parse_args()
    vb.script("group_norm", args, extra=probes("group_norm") if args.probes else None)


if __name__ == "__main__":
    main()
