"""ConvTranspose2d (forward, fwd+bwd, up-conv + concat) vs cuDNN and torch.compile; prints tables, writes JSON.

The second table gives TFLOP/s and the % of a bf16 matmul rate measured in the same run.

    python benchmarks/bench_conv_transpose.py [--device cuda] [--dtypes bfloat16] [--no-compile]
        [--json benchmarks/results/<card>-<date>/conv_transpose.json]
"""

import argparse

import torch

from vlfast import bench as vb
from vlfast.bench.conv_transpose import flops_table, matmul_tflops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    info, copy_gbps, rows = vb.run(device, ("conv_transpose",), dtypes=dtypes, compile_=not args.no_compile)
    vb.report(info, copy_gbps, rows, args.json)
    if device.type == "cuda":
        print(f"measured bf16 matmul 8192^3: {matmul_tflops('cuda'):.0f} TFLOP/s")
    print(flops_table(rows))


if __name__ == "__main__":
    main()
