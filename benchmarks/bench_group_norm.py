"""GroupNorm + time embedding (+ scale-shift) + SiLU vs eager PyTorch and torch.compile; prints a table, writes JSON.

    python benchmarks/bench_group_norm.py [--device cuda] [--json benchmarks/results/<card>-<date>/group_norm.json]
"""

from vlfast import bench as vb


def main():
    vb.script("group_norm", vb.parser(__doc__).parse_args())


if __name__ == "__main__":
    main()
