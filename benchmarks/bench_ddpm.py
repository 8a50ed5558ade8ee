"""Fused DDPM step vs the step as diffusers computes it (eager and torch.compile); prints a table, writes JSON.

    python benchmarks/bench_ddpm.py [--device cuda] [--json benchmarks/results/ddpm-<card>-<date>.json]
"""

import argparse

import torch

from vlfast import bench as vb
from vlfast.bench.ddpm import CPU_SHAPES, GPU_SHAPES


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="the smallest and the largest shape only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = [shapes[0], shapes[-1]]
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    info, copy_gbps, rows = vb.run(device, ("ddpm",), shapes=shapes, dtypes=dtypes, compile_=not args.no_compile)
    vb.report(info, copy_gbps, rows, args.json)


if __name__ == "__main__":
    main()
