"""Drop-in DDPM and DDIM schedulers whose ``step`` is one fused kernel.

``vlfast.schedulers.DDPMScheduler`` and ``DDIMScheduler`` take the constructor arguments of the
diffusers classes of the same names and offer their methods; ``step`` calls
:func:`vlfast.ops.ddpm.fused_step` once, with no host-device synchronisation.

Every update is a row of a (num_train_timesteps, 8) table ``coef`` (float32; float64 for float64
samples), built on the host in float64 from the float32 ``alphas_cumprod`` (columns of
:mod:`vlfast.reference.ddpm`).
With ab = alphas_cumprod[t], ab' = alphas_cumprod[prev_t] (or the final value when prev_t < 0),
x the sample, m the model output:

    x0 = A_X x + A_M m       epsilon: (1/sqrt(ab), -sqrt(1-ab)/sqrt(ab)), (2**100, -2**100) where ab = 0;
                             sample: (0, 1);  v_prediction: (sqrt(ab), -sqrt(1-ab))
    DDPM (Ho et al. 2020, formula (7)), prev_t = the next timestep of the schedule (t - 1 without one):
        K_0 = sqrt(ab') beta_t / (1 - ab),  K_X = sqrt(alpha_t) (1 - ab') / (1 - ab),  K_M = 0,
        alpha_t = ab / ab', beta_t = 1 - alpha_t, var = max((1 - ab') / (1 - ab) beta_t, 1e-20),
        SIGMA = sqrt(var) (fixed_small, fixed_small_log) | sqrt(beta_t) (fixed_large, fixed_large_log)
              | 1 (learned: times sqrt(v); learned_range: times exp(0.5 lerp(LOG_MIN, LOG_MAX, (v + 1) / 2))
                with LOG_MIN = log(var), LOG_MAX = log(beta_t)),  and SIGMA = 0 at t = 0.
        Rows of timesteps outside the schedule are NaN.
    DDIM (Song et al. 2021, formula (12)), prev_t = t - T // num_inference_steps:
        std = eta sqrt((1 - ab') / (1 - ab) (1 - ab / ab')), c = sqrt(1 - ab' - std^2),
        prev = sqrt(ab') x0c + c eps + std z, eps linear in (x, m) per prediction type or, with
        use_clipped_model_output, (x - sqrt(ab) x0c) / sqrt(1 - ab): folded into K_0, K_X, K_M.
    Forward noising (add_noise): K_X = sqrt(ab), SIGMA = sqrt(1 - ab), the rest 0.
Where diffusers is installed both classes are diffusers ``SchedulerMixin`` / ``ConfigMixin`` subclasses
(so pipelines save and load them); without it, :mod:`vlfast.schedulers._fallback` gives the same surface.
"""

from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput", "DDIMScheduler", "DDIMSchedulerOutput"]
