"""DDIMScheduler: diffusers' DDIM sampler (Song et al. 2021) with a one-kernel ``step``."""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..ops.ddpm import check_sample, fused_step
from ..reference import ddpm as ref
# SchedulerMixin is looked up here by diffusers' pipeline loader: model_index.json names this module.
from ._base import (SchedulerBase, SchedulerMixin, StepOutput, check_like, randn_per_sample,  # noqa: F401
                    register_to_config, spaced_timesteps, table_dtype, x0_columns)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class DDIMSchedulerOutput(StepOutput):
    """What :meth:`DDIMScheduler.step` returns (diffusers' ``DDIMSchedulerOutput``): ``prev_sample`` and
    ``pred_original_sample``, as a diffusers ``BaseOutput`` (see ``StepOutput``)."""


class DDIMScheduler(SchedulerBase):
    """Drop-in for ``diffusers.DDIMScheduler``: same constructor, config, attributes and methods.

    ``step`` runs one fused kernel (``vlfast.ops.ddpm.fused_step``) with no host-device
    synchronisation. Its coefficients are rows of a (num_train_timesteps, 8) table per
    ``(eta, use_clipped_model_output)`` (the MAX_ETA_TABLES most recently used are kept per device),
    built on the host in float64 from the float32 ``alphas_cumprod`` (see :mod:`vlfast.schedulers`)
    after :meth:`set_timesteps`, moved once per device.

    In-kernel noise depends on the generator and on an on-device step counter that each step
    advances (so that a captured CUDA graph draws fresh noise on every replay); ``set_timesteps``
    restarts the counter, so reseeding the generator and calling ``set_timesteps`` reproduces a run.
    A list of generators (one per sample) draws the noise as diffusers does (``torch.randn`` per
    sample) and passes it to the kernel: sample i's noise depends on generator i alone.

    Where diffusers is installed the class is a diffusers ``SchedulerMixin`` / ``ConfigMixin`` (saving,
    loading, ``from_config``, ``compatibles`` as for diffusers' own; without it: ``_fallback.py``).

    Differences from diffusers: unknown ``beta_schedule`` / ``prediction_type`` / ``timestep_spacing``
    raise ``ValueError`` in the constructor; ``timestep`` may be a per-sample (B,) tensor; with one
    generator (not a list) the random stream differs (in-kernel Philox instead of ``torch.randn``);
    ``model_output`` must have the dtype of ``sample``; ``sqrt(1 - alpha_prev - std^2)`` is taken of a
    value clamped at 0 (diffusers: NaN if float32 rounding makes it negative); a float
    ``num_inference_steps`` works in ``step`` too (diffusers: IndexError). With ``rescale_betas_zero_snr``
    and "epsilon", x0 at the last timestep (alphas_cumprod = 0) is +-2**100 (x - m) where diffusers has
    +-inf: after clip_sample both give +-clip_sample_range (also with use_clipped_model_output); with
    thresholding we give +-1 where diffusers gives NaN; with neither, both are huge or infinite.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._setup(BETA_SCHEDULES)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None) -> None:
        """Set ``self.timesteps`` (descending int64, on ``device``) and rebuild the step tables.

        ``num_inference_steps``: an int, or a float as diffusers allows. Spacing by
        ``config.timestep_spacing`` (plus ``steps_offset`` for "leading"). With ``device``,
        the eta = 0 table and the noise counter are put there now (needed before capturing a CUDA
        graph). Equivalent diffusers call: ``scheduler.set_timesteps(num_inference_steps, device=device)``.
        """
        cfg = self.config
        array = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(array).to(device)
        self._new_schedule(device, ((0.0, False),))

    def _get_variance(self, timestep, prev_timestep) -> Tensor:
        """(1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), as diffusers' ``_get_variance``."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def _build_table(self, key) -> Tensor:
        """Rows t of x_{t-1} = sqrt(ab_prev) clip(x0) + sqrt(1 - ab_prev - std^2) eps + std z (formula (12))."""
        if not isinstance(key, tuple):
            return super()._build_table(key)
        eta, use_clipped = key
        cfg = self.config
        ac = self.alphas_cumprod.double()
        t = torch.arange(cfg.num_train_timesteps)
        prev = t - int(cfg.num_train_timesteps // self.num_inference_steps)
        ab = ac
        final = torch.full_like(ab, float(self.final_alpha_cumprod))
        ab_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        beta, beta_prev = 1 - ab, 1 - ab_prev
        std = eta * ((beta_prev / beta) * (1 - ab / ab_prev)).sqrt()
        c_dir = (1 - ab_prev - std ** 2).clamp(min=0).sqrt()
        coef = torch.zeros(t.shape[0], ref.N_COEF, dtype=torch.float64)
        coef[:, ref.A_X], coef[:, ref.A_M] = x0_columns(cfg.prediction_type, ab)
        coef[:, ref.K_0] = ab_prev.sqrt()
        # eps, folded into K_0 / K_X / K_M: from the clipped x0, or linear in (x, m) per prediction type.
        if use_clipped:          # eps = (x - sqrt(ab) x0c) / sqrt(1 - ab)
            coef[:, ref.K_X] = c_dir / beta.sqrt()
            coef[:, ref.K_0] -= c_dir * ab.sqrt() / beta.sqrt()
        elif cfg.prediction_type == "epsilon":   # eps = m
            coef[:, ref.K_M] = c_dir
        elif cfg.prediction_type == "sample":    # eps = (x - sqrt(ab) m) / sqrt(1 - ab)
            coef[:, ref.K_X] = c_dir / beta.sqrt()
            coef[:, ref.K_M] = -c_dir * ab.sqrt() / beta.sqrt()
        else:                                    # v_prediction: eps = sqrt(ab) m + sqrt(1 - ab) x
            coef[:, ref.K_X] = c_dir * beta.sqrt()
            coef[:, ref.K_M] = c_dir * ab.sqrt()
        coef[:, ref.SIGMA] = std
        return coef

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None,
             variance_noise: Optional[Tensor] = None, return_dict: bool = True, *,
             return_pred_original_sample: bool = True, out: Optional[Tensor] = None, backend: Optional[str] = None):
        """x_{t-1} from the model output at ``timestep``, in one fused kernel.

        model_output, sample: (B, C, *S) float32/float16/bfloat16 (same dtype; float64: computed in
        float64 by the reference), any dense layout; timestep: int, numpy integer, 0-d or per-sample (B,)
        integer tensor (a device one read on the device); eta: the weight of the noise (0: deterministic
        DDIM, 1: DDPM-like); with eta > 0 the noise is ``variance_noise``, drawn in the kernel from
        ``generator``, or, for a list of B (or 1) generators, diffusers' per-sample ``torch.randn`` noise.
        Returns DDIMSchedulerOutput(prev_sample, pred_original_sample) or, with ``return_dict=False``,
        that tuple. Equivalent diffusers call: ``diffusers.DDIMScheduler.step(model_output, timestep,
        sample, eta, use_clipped_model_output, generator, variance_noise, return_dict)``. vlfast extras
        (keyword-only): ``return_pred_original_sample=False`` skips writing pred_original_sample (None
        then; one tensor less to write), ``out`` (sample's shape and dtype, any strides; it may be
        ``sample`` itself) receives x_{t-1} and is returned as ``prev_sample`` (see
        ``vlfast.ops.fused_step``; a loop reusing it allocates nothing), ``backend`` forces a backend.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        check_sample(sample)
        timestep = self._host_timestep(timestep)
        eta = float(eta)
        noise, draw = None, False
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            if variance_noise is not None:
                check_like("variance_noise", variance_noise, sample)
                noise = variance_noise
            elif isinstance(generator, (list, tuple)):
                noise = randn_per_sample(generator, sample)
            else:
                draw = True
        if isinstance(generator, (list, tuple)):
            generator = None
        key = (eta, bool(use_clipped_model_output))
        device = sample.device
        coef = self._table(key, device, table_dtype(sample.dtype))
        thresh = None
        if self._thresholding:
            thresh, timestep = self._thresholds(coef, model_output, timestep, sample)
        prev, x0, _ = fused_step(sample, model_output, coef, timestep, noise=noise, thresh=thresh, clip=self._clip,
                                 draw_noise=draw, generator=generator,
                                 rng_state=self._rng_arg(device, draw), write_x0=return_pred_original_sample,
                                 out=out, backend=backend)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
