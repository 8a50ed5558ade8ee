"""The fused DDPM/DDIM update, written as plain PyTorch: the spec every backend follows.

One elementwise pass computes, for each sample ``n`` with coefficient row
``k = coef[timesteps[n]]`` (or ``coef[timestep]``), in float32 (float64 for a
float64 sample, whose coef may then be float64 too):

    x0   = k[A_X] * x + k[A_M] * m                    # predicted original sample
    x0c  = clamp(x0, -s_n, s_n) / s_n                 # dynamic thresholding, if thresh
         | clamp(x0, -clip, clip)                     # clip_sample, if clip is finite
    sig  = k[SIGMA]                                   # VAR_FIXED
         | k[SIGMA] * sqrt(v)                         # VAR_LEARNED   (v: predicted variance)
         | k[SIGMA] * exp(0.5 * lerp(k[LOG_MIN], k[LOG_MAX], (v + 1) / 2))   # VAR_LEARNED_RANGE
    prev = k[K_0] * x0c + k[K_X] * x + k[K_M] * m + sig * z

``z`` is the given ``noise`` or, with ``draw_noise``, Philox noise (see
:mod:`vlfast.reference.philox`) drawn from ``(seed, offset + rng_state[0])``;
with ``rng_state`` the call then advances ``rng_state[0]`` by one on the
device, so a replayed CUDA graph draws fresh noise. A learned sigma is only
applied where ``k[SIGMA] != 0`` (so t = 0 adds nothing, even for a NaN ``v``).
A timestep outside ``[0, len(coef))`` gives NaN coefficients (checked on the
device, no host synchronisation).

DDPM (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021) and the forward
noising of training (Algorithm 1) are all rows of ``coef``: see
:mod:`vlfast.schedulers`.
"""

import torch

# Columns of a coefficient row.
A_X, A_M, K_0, K_X, K_M, SIGMA, LOG_MIN, LOG_MAX = range(8)
N_COEF = 8
# How sigma is formed.
VAR_FIXED, VAR_LEARNED, VAR_LEARNED_RANGE = 0, 1, 2


def gather_rows(coef: torch.Tensor, timesteps, timestep: int, batch: int) -> torch.Tensor:
    """(batch, N_COEF) rows in coef's dtype; NaN rows for out-of-range timesteps."""
    rows = coef.shape[0]
    if timesteps is None:
        t = torch.full((batch,), int(timestep), device=coef.device, dtype=torch.int64)
    else:
        t = timesteps.to(device=coef.device, dtype=torch.int64).reshape(-1).expand(batch)
    valid = (t >= 0) & (t < rows)
    k = coef[t.clamp(0, max(rows - 1, 0))]
    return torch.where(valid[:, None], k, torch.full_like(k, float("nan")))


def fused_step(sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip,
               var_mode, draw_noise, seed, offset, rng_state, write_x0, write_noise):
    """Reference for ``torch.ops.vlfast.ddpm_step``; returns ``(prev, x0, noise)``.

    Shapes: sample (B, *S); model_output and variance None or like sample;
    noise None or like sample; coef (R, 8) float32 (or float64); timesteps None,
    (1,) or (B,) int; thresh None or (B,) float32 (float64 beside a float64 sample);
    rng_state None or (2,) int64.
    Computes in float32, or float64 for a float64 sample.
    ``x0`` and ``noise`` are empty (0,) tensors unless asked for.
    """
    from .philox import randn_philox

    batch = sample.shape[0]
    per_sample = sample[0].numel() if batch else 0
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    k = gather_rows(coef.to(acc), timesteps, timestep, batch)
    view = (batch,) + (1,) * (sample.dim() - 1)
    col = lambda j: k[:, j].reshape(view)  # noqa: E731
    x = sample.to(acc)
    m = model_output.to(acc) if model_output is not None else torch.zeros_like(x)

    x0 = col(A_X) * x + col(A_M) * m
    if thresh is not None:
        s = thresh.to(acc).reshape(view)
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s
    elif clip != float("inf"):
        x0 = x0.clamp(-clip, clip)

    sig = col(SIGMA)
    if var_mode == VAR_LEARNED:
        sig = torch.where(sig != 0, sig * torch.sqrt(variance.to(acc)), torch.zeros_like(x))
    elif var_mode == VAR_LEARNED_RANGE:
        frac = (variance.to(acc) + 1) / 2
        log_var = frac * col(LOG_MAX) + (1 - frac) * col(LOG_MIN)
        sig = torch.where(sig != 0, sig * torch.exp(0.5 * log_var), torch.zeros_like(x))

    prev = col(K_0) * x0 + col(K_X) * x + col(K_M) * m
    z = None
    if noise is not None:
        z = noise.to(acc)
    elif draw_noise:
        off = offset if rng_state is None else rng_state[0] + offset
        z = _in_memory_order(randn_philox(seed, off, batch, per_sample, sample.device), sample).to(acc)
        if rng_state is not None:
            rng_state[0] += 1
    if z is not None:
        prev = prev + sig * z

    out = torch.empty_like(sample).copy_(prev)
    x0_out = torch.empty_like(sample).copy_(x0) if write_x0 else sample.new_empty((0,))
    z_out = torch.empty_like(sample).copy_(z) if (write_noise and z is not None) else sample.new_empty((0,))
    return out, x0_out, z_out


def _in_memory_order(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Lay a (B, per_sample) block out so element r of sample n sits at memory offset r of ``like``."""
    out = torch.empty_like(like, dtype=torch.float32)
    if out.numel():
        out.as_strided((out.numel(),), (1,)).copy_(z.reshape(-1))
    return out


def ddpm_step_eager(model_output, sample, alphas_cumprod, t: int, prev_t: int, noise, clip=1.0):
    """DDPM step the way diffusers computes it (epsilon prediction, clip, fixed_small variance).

    The speed baseline of ``benchmarks/bench_ddpm.py``: about ten kernels per call.
    """
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.ones_like(alpha_prod_t)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    x0 = x0.clamp(-clip, clip)
    prev = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t * x0
    prev = prev + current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t * sample
    if t > 0:
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        prev = prev + variance ** 0.5 * noise
    return prev, x0
