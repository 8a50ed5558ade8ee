"""ConvTranspose2d (forward, fwd+bwd, up-conv + concat) vs cuDNN and torch.compile; prints tables, writes JSON.

The second table gives TFLOP/s and the % of a bf16 matmul rate measured in the same run.

    python benchmarks/bench_conv_transpose.py [--device cuda] [--dtypes bfloat16] [--no-compile] [--probes]
        [--json benchmarks/results/<card>-<date>/conv_transpose.json]

``--probes`` adds the tuning probes of tools/probes.py (the phase kernel forced) on a GPU.
"""

import _probes
from vlfast import bench as vb
from vlfast.bench.conv_transpose import flops_table, matmul_tflops


def main():
    p = vb.parser(__doc__)
    _probes.add_option(p)
    args = p.parse_args()
    rows = vb.script("conv_transpose", args, extra=_probes.extra("conv_transpose", args))
    if args.device == "cuda":
        print(f"measured bf16 matmul 8192^3: {matmul_tflops('cuda'):.0f} TFLOP/s")
    print(flops_table(rows))


if __name__ == "__main__":
    main()
