"""Tile sweep of the Triton DDPM kernel on the largest benchmark shape (GPU only).

For each dtype and (BLOCK, num_warps): the step with in-kernel noise, and the same
kernel without noise (the memory-only floor Triton reaches), against a device copy.

    python tools/sweep_ddpm.py [--json out.json]
"""

import argparse
import json

import torch
from triton.testing import do_bench

from vlfast.kernels.ddpm import ddpm_step_kernel
from vlfast.schedulers import DDPMScheduler
from vlfast.schedulers.ddpm import STEP_TABLE

SHAPE = (8, 3, 1024, 1024)
CONFIGS = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]


def launch(x, m, out, coef, block, warps, noise_mode):
    batch, per = x.shape[0], x[0].numel()
    grid = (batch, -(-per // block))
    ddpm_step_kernel[grid](x, m, x, x, out, out, out, coef, coef, coef, coef, per, per, per, per, 0,
                           coef.shape[0], 500, 1.0, 1234, 0, HAS_M=True, VAR_MODE=0, NOISE=noise_mode,
                           HAS_STATE=False, T_FROM_PTR=False, CLIP=True, THRESH=False, WRITE_X0=False,
                           WRITE_NOISE=False, BLOCK=block, num_warps=warps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    coef = DDPMScheduler()._table(STEP_TABLE, torch.device("cuda"))
    results = []
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_gbps = 2 * src.numel() * 4 / copy_ms / 1e6
    print(f"copy {copy_gbps:.0f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(SHAPE, device="cuda", dtype=dtype)
        m = torch.randn_like(x)
        out = torch.empty_like(x)
        nbytes = 3 * x.numel() * x.element_size()
        for block, warps in CONFIGS:
            for mode, name in ((2, "noise"), (0, "no-noise")):
                ms = do_bench(lambda: launch(x, m, out, coef, block, warps, mode), return_mode="median")
                gbps = nbytes / ms / 1e6
                results.append(dict(dtype=str(dtype), block=block, warps=warps, variant=name, us=ms * 1e3,
                                    gbps=gbps, pct_copy=100 * gbps / copy_gbps))
                print(f"{str(dtype):15s} BLOCK {block:5d} warps {warps:2d} {name:9s} {ms * 1e3:7.1f} us "
                      f"{gbps:6.0f} GB/s {100 * gbps / copy_gbps:4.0f}% of copy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "shape": SHAPE, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
