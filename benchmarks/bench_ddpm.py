"""Fused DDPM step vs the step as diffusers computes it (eager and torch.compile); prints a table, writes JSON.

    python benchmarks/bench_ddpm.py [--device cuda] [--json benchmarks/results/ddpm-<card>-<date>.json]
"""

from vlfast import bench as vb
from vlfast.bench.ddpm import CPU_SHAPES, GPU_SHAPES


def main():
    p = vb.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="the smallest and the largest shape only")
    args = p.parse_args()
    shapes = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    vb.script("ddpm", args, shapes=[shapes[0], shapes[-1]] if args.quick else shapes)


if __name__ == "__main__":
    main()
