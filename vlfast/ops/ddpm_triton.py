"""The Triton launcher of the fused DDPM/DDIM step (kernel: vlfast/kernels/ddpm.py; the custom op, its
checks and its declaration: vlfast/ops/ddpm.py)."""

import torch

from .. import backends
from ._common import cdiv

MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (the blocks of one sample)


def block_for(per_sample: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 16 elements a thread on large samples, fewer programs idle on small ones."""
    if per_sample >= 1 << 16:
        return 4096, 8
    if per_sample >= 4096:
        return 2048, 4
    return 1024, 4


def max_per_sample(per_sample: int) -> int:
    """The most elements a sample may have at the block size of ``per_sample``: the grid's second axis
    holds one sample's blocks."""
    return MAX_GRID_Y * block_for(per_sample)[0]


def ddpm_step(sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip,
              var_mode, draw_noise, seed, offset, rng_state, write_x0, write_noise, out=None):
    """The ``triton`` backend of ``torch.ops.vlfast.ddpm_step`` (same arguments, less the backend): one
    launch of kernels/ddpm.py's kernel, a program per (sample, block of BLOCK elements). Returns
    (prev, x0 or an empty tensor, noise or an empty tensor); arguments are assumed checked. ``out``: where
    given, prev is written into it (sample's strides; it may be sample, model_output, variance or noise
    itself: each program reads its block before writing it) and returned."""
    from vlfast.kernels.ddpm import ddpm_step_kernel

    batch = sample.shape[0]
    per_sample = sample.numel() // batch if batch else 0
    out = torch.empty_like(sample) if out is None else out
    noise_mode = 1 if noise is not None else (2 if draw_noise else 0)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty((0,))
    z_out = torch.empty_like(sample) if (write_noise and noise_mode) else sample.new_empty((0,))
    if batch == 0 or per_sample == 0:
        return out, x0, z_out
    block, warps = block_for(per_sample)
    grid = (batch, cdiv(per_sample, block))
    if per_sample > max_per_sample(per_sample):  # the op's limits keep such inputs away: a direct call only
        raise ValueError(f"sample has {per_sample} elements per sample; at most {max_per_sample(per_sample)} "
                         "are supported")
    # Absent operands are replaced by any valid pointer: the constexpr flags keep them unread.
    m = model_output if model_output is not None else sample
    v = variance if variance is not None else sample
    z = noise if noise is not None else sample
    t = timesteps if timesteps is not None else coef
    with backends.device_guard(sample):
        ddpm_step_kernel[grid](
            sample, m, v, z, out, x0 if write_x0 else out, z_out if z_out.numel() else out,
            coef, t, thresh if thresh is not None else coef, rng_state if rng_state is not None else coef,
            per_sample, m.stride(0), v.stride(0), z.stride(0),
            (1 if timesteps.shape[0] > 1 else 0) if timesteps is not None else 0,
            coef.shape[0], timestep, clip if clip != float("inf") else 0.0, seed, offset,
            HAS_M=model_output is not None, VAR_MODE=var_mode, NOISE=noise_mode,
            HAS_STATE=rng_state is not None and noise_mode == 2, T_FROM_PTR=timesteps is not None,
            CLIP=clip != float("inf"), THRESH=thresh is not None, WRITE_X0=write_x0, WRITE_NOISE=bool(z_out.numel()),
            BLOCK=block, num_warps=warps,
        )
    return out, x0, z_out
