"""GroupNorm + time embedding (+ scale-shift) + SiLU vs eager PyTorch and torch.compile; prints a table, writes JSON.

    python benchmarks/bench_group_norm.py [--device cuda] [--probes]
        [--json benchmarks/results/<card>-<date>/group_norm.json]

``--probes`` adds the tuning probes of tools/probes.py (forced Triton paths) on a GPU.
"""

import _probes
from vlfast import bench as vb


def main():
    p = vb.parser(__doc__)
    _probes.add_option(p)
    args = p.parse_args()
    vb.script("group_norm", args, extra=_probes.extra("group_norm", args))


if __name__ == "__main__":
    main()
