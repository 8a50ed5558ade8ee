"""Whole models (seed U-Net, DDPM CIFAR U-Net, VAE decoder) and a DDPM sampling loop vs eager and torch.compile.

Forward and training step of each model: eager, torch.compile, vlfast.nn.convert (defaults, and conv2d="all"),
converted + compiled; the sampling loop: diffusers' DDPMPipeline against vlfast.sampling on the same
UNet2DModel (vlfast.bench.models lists the sizes and the rules). Prints the models' table (ms, TFLOP/s,
speed-ups over eager and torch.compile) and writes JSON; exits with status 1 if a provider failed its check.

    python benchmarks/bench_models.py [--device cuda] [--dtypes bfloat16] [--no-compile] [--quick] [--nchw]
        [--models ddpm_unet sampling seed_unet vae_decoder]
        [--json benchmarks/results/<card>-<date>/models.json]
"""

import sys

import torch

from vlfast import bench as vb
from vlfast.bench.models import CPU_CONFIGS, GPU_CONFIGS, NAMES, models_table, notes, select


def main():
    p = vb.parser(__doc__)
    p.add_argument("--models", nargs="*", default=None, choices=NAMES, help="models to run (default: all)")
    p.add_argument("--quick", action="store_true", help="forward only (no training step), at most 10 sampling steps")
    p.add_argument("--nchw", action="store_true", help="the default memory format instead of channels_last")
    args = p.parse_args()
    every = GPU_CONFIGS if torch.device(args.device).type == "cuda" else CPU_CONFIGS
    configs = select(every, args.models, quick=args.quick, nchw=args.nchw)
    if not configs:
        p.error("no model selected")
    rows = vb.script("models", args, shapes=configs)
    print(models_table(rows))
    for line in notes(rows):
        print(f"note: {line}")
    if any(r.timing is None for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
