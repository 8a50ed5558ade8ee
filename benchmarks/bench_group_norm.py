"""GroupNorm + time embedding (+ scale-shift) + SiLU vs eager PyTorch and torch.compile; prints a table, writes JSON.

    python benchmarks/bench_group_norm.py [--device cuda] [--json benchmarks/results/<card>-<date>/group_norm.json]
"""

import argparse

import torch

from vlfast import bench as vb


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    info, copy_gbps, rows = vb.run(device, ("group_norm",), dtypes=dtypes, compile_=not args.no_compile)
    vb.report(info, copy_gbps, rows, args.json)


if __name__ == "__main__":
    main()
