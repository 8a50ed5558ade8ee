"""Conv2d + bias + activation (+ residual, + ASPP concat) vs cuDNN and torch.compile; prints tables, writes JSON.

Dilated context-module layers and the module end to end, 256-channel dilated 3x3s, ASPP into one concat
buffer, a ResNet 3x3 + residual + ReLU and the DDPM U-Net's ordinary 3x3s (vlfast.bench.conv2d lists the
shapes). The second table gives TFLOP/s and the % of a bf16 matmul rate measured in the same run.

    python benchmarks/bench_conv2d.py [--device cuda] [--dtypes bfloat16] [--no-compile]
        [--cases context module dilated aspp resnet ddpm]
        [--json benchmarks/results/<card>-<date>/conv2d.json] [--probes]

``--probes`` adds the tuning probes of tools/probes.py (tile configs of the Triton forward) on a GPU.
"""

import _probes
import torch

from vlfast import bench as vb
from vlfast.bench.conv2d import CPU_CASES, GPU_CASES, GROUPS, flops_table, matmul_tflops


def main():
    p = vb.parser(__doc__)
    p.add_argument("--cases", nargs="*", default=None, choices=GROUPS, help="groups of cases to run (default: all)")
    _probes.add_option(p)
    args = p.parse_args()
    every = GPU_CASES if torch.device(args.device).type == "cuda" else CPU_CASES
    shapes = {k: c for k, c in every.items() if c.group in args.cases} if args.cases else None
    if shapes == {}:
        p.error(f"no {args.device} case in the groups {args.cases}")
    rows = vb.script("conv2d", args, shapes=shapes, extra=_probes.extra("conv2d", args))
    if args.device == "cuda":
        print(f"measured bf16 matmul 8192^3: {matmul_tflops('cuda'):.0f} TFLOP/s")
    print(flops_table(rows))


if __name__ == "__main__":
    main()
