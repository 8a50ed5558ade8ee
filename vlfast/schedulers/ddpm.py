"""DDPMScheduler: diffusers' DDPM sampler (Ho et al. 2020, Algorithm 2) with a one-kernel ``step``."""

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..ops.ddpm import check_sample, fused_step
from ..reference import ddpm as ref
# SchedulerMixin is looked up here by diffusers' pipeline loader: model_index.json names this module.
from ._base import (SchedulerBase, SchedulerMixin, StepOutput, check_choice, check_like,  # noqa: F401
                    randn_per_sample, register_to_config, spaced_timesteps, table_dtype, x0_columns)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
STEP_TABLE = "step"


@dataclass
class DDPMSchedulerOutput(StepOutput):
    """What :meth:`DDPMScheduler.step` returns (diffusers' ``DDPMSchedulerOutput``): ``prev_sample`` and
    ``pred_original_sample``, as a diffusers ``BaseOutput`` (see ``StepOutput``)."""


class DDPMScheduler(SchedulerBase):
    """Drop-in for ``diffusers.DDPMScheduler``: same constructor, config, attributes and methods.

    ``step`` runs one fused kernel (``vlfast.ops.ddpm.fused_step``) with no host-device
    synchronisation: the per-timestep coefficients are rows of a (num_train_timesteps, 8) table built
    on the host in float64 from the float32 ``alphas_cumprod`` (see :mod:`vlfast.schedulers`), moved
    once to each device and rebuilt (in place) by :meth:`set_timesteps`. Noise is drawn inside the kernel
    (Philox, :mod:`vlfast.reference.philox`) unless ``noise=`` is given.

    In-kernel noise depends on the generator and on an on-device step counter that each step
    advances (so that a captured CUDA graph draws fresh noise on every replay); ``set_timesteps``
    restarts the counter, so reseeding the generator and calling ``set_timesteps`` reproduces a run.
    A list of generators (one per sample, as diffusers' pipelines pass) draws the noise as diffusers
    does, with ``torch.randn`` per sample on the host side, and passes it to the kernel: sample i's
    noise then depends on generator i alone, and equals diffusers'.

    Where diffusers is installed the class is a diffusers ``SchedulerMixin`` / ``ConfigMixin``:
    ``save_pretrained``, ``from_pretrained``, ``from_config``, ``compatibles`` and pipelines' saving and
    loading work as for diffusers' own schedulers (without diffusers: vlfast.schedulers._fallback).

    Differences from diffusers:
      * ``variance_type="fixed_large_log"``: diffusers takes ``sqrt(log(beta_t))``, which is NaN; we use
        ``exp(0.5 * log(beta_t)) = sqrt(beta_t)``, so it samples exactly like ``"fixed_large"``.
      * Unknown ``beta_schedule`` / ``prediction_type`` / ``variance_type`` / ``timestep_spacing`` raise
        ``ValueError`` in the constructor (diffusers: ``NotImplementedError`` or an error at step time).
      * ``step`` takes keyword-only ``noise=`` (like DDIM's ``variance_noise``) and a per-sample (B,)
        ``timestep`` tensor. A host timestep (int, numpy integer, CPU tensor) not in the schedule raises
        ValueError; a CUDA tensor one gives NaN (read on the device, no synchronisation; diffusers: IndexError).
      * With one generator (not a list) the random stream differs (in-kernel Philox instead of
        ``torch.randn``); ``model_output`` must have the dtype of ``sample``; learned variance types need
        the 2C-channel ``model_output``.
      * With ``rescale_betas_zero_snr`` and "epsilon", x0 at the last timestep (alphas_cumprod = 0) is
        +-2**100 (x - m) where diffusers has +-inf: the same after clip_sample; with thresholding we give
        +-1 where diffusers gives NaN.
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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._setup(BETA_SCHEDULES)
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        var_modes = {"learned": ref.VAR_LEARNED, "learned_range": ref.VAR_LEARNED_RANGE}
        self._var_mode = var_modes.get(variance_type, ref.VAR_FIXED)

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      timesteps: Optional[list] = None) -> None:
        """Set ``self.timesteps`` (descending int64, on ``device``) and rebuild the step table.

        Either ``num_inference_steps`` (an int, or a float as diffusers allows; spaced by
        ``config.timestep_spacing``, plus ``steps_offset`` for "leading") or descending custom ``timesteps``.
        With ``device``, the table and the noise counter are put there now (needed before capturing a CUDA
        graph). Equivalent diffusers call: ``scheduler.set_timesteps(num_inference_steps, device, timesteps)``.
        """
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if ts and ts[0] >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            if ts and ts[-1] < 0:
                raise ValueError(f"timesteps must be non-negative; got {ts[-1]}")
            array = np.array(ts, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or timesteps")
            cfg = self.config
            array = spaced_timesteps(cfg.timestep_spacing, T, num_inference_steps, cfg.steps_offset)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(array).to(device)
        self._schedule = frozenset(array.tolist()) if self._uses_schedule() else None
        self._new_schedule(device, (STEP_TABLE,))

    def _uses_schedule(self) -> bool:
        return bool(self.custom_timesteps or self.num_inference_steps)

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (-1 at its end), or ``timestep - 1`` without one."""
        if self._uses_schedule():
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def _build_table(self, key) -> Tensor:
        """Rows t of the DDPM update x_{t-1} = K_0 clip(x0) + K_X x_t + SIGMA z (formula (7) of Ho et al.)."""
        if key != STEP_TABLE:
            return super()._build_table(key)
        cfg = self.config
        ac = self.alphas_cumprod.double()
        T = cfg.num_train_timesteps
        if self._uses_schedule():
            ts = self.timesteps.cpu().tolist()
            first = {}
            for i, t in enumerate(ts):  # diffusers takes the first occurrence of t
                if t < T:  # "leading" with steps_offset can give t = T, which has no row (nor in diffusers)
                    first.setdefault(t, ts[i + 1] if i + 1 < len(ts) else -1)
            t = torch.tensor(list(first.keys()), dtype=torch.int64)
            prev = torch.tensor(list(first.values()), dtype=torch.int64)
        else:
            t = torch.arange(T)
            prev = t - 1
        ab = ac[t]
        ab_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(ab))
        cur_alpha = ab / ab_prev
        cur_beta = 1 - cur_alpha
        var = ((1 - ab_prev) / (1 - ab) * cur_beta).clamp(min=1e-20)
        rows = torch.zeros(t.shape[0], ref.N_COEF, dtype=torch.float64)
        rows[:, ref.A_X], rows[:, ref.A_M] = x0_columns(cfg.prediction_type, ab)
        rows[:, ref.K_0] = ab_prev.sqrt() * cur_beta / (1 - ab)
        rows[:, ref.K_X] = cur_alpha.sqrt() * (1 - ab_prev) / (1 - ab)
        vt = cfg.variance_type
        if vt == "fixed_small":
            sigma = var.sqrt()
        elif vt == "fixed_small_log":
            sigma = torch.exp(0.5 * torch.log(var))
        elif vt in ("fixed_large", "fixed_large_log"):  # fixed_large_log: exp(0.5 log beta), see class docstring
            sigma = torch.exp(0.5 * torch.log(cur_beta)) if vt == "fixed_large_log" else cur_beta.sqrt()
        else:
            sigma = torch.ones_like(ab)  # times sqrt(v) or exp(0.5 lerp(LOG_MIN, LOG_MAX, (v + 1) / 2))
            if vt == "learned_range":
                rows[:, ref.LOG_MIN] = torch.log(var)
                rows[:, ref.LOG_MAX] = torch.log(cur_beta)
        rows[:, ref.SIGMA] = torch.where(t > 0, sigma, torch.zeros_like(sigma))  # no noise at t = 0
        coef = torch.full((T, ref.N_COEF), float("nan"), dtype=torch.float64)
        coef[t] = rows
        return coef

    def _get_variance(self, t, predicted_variance: Optional[Tensor] = None, variance_type: Optional[str] = None):
        """The variance term of timestep ``t``, exactly as diffusers' ``DDPMScheduler._get_variance`` gives it
        (float32; "fixed_large_log" gives log(beta_t)). ``step`` does not call it: its table holds the same."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        variance_type = variance_type or self.config.variance_type
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)
        return variance  # fixed_small

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             noise: Optional[Tensor] = None, return_pred_original_sample: bool = True, out: Optional[Tensor] = None,
             backend: Optional[str] = None):
        """x_{t-1} from the model output at ``timestep``, in one fused kernel.

        model_output: (B, C, *S), or (B, 2C, *S) for learned variance types (the second half is the
        predicted variance); sample: (B, C, *S) float32/float16/bfloat16 (float64: computed in float64 by
        the reference), any dense layout; timestep: int, numpy integer, 0-d or per-sample (B,) integer
        tensor (a host one is checked against the schedule, a device one read on the device); generator:
        a torch.Generator (noise drawn in the kernel) or a list of B (or 1) of them (diffusers' per-sample
        ``torch.randn`` noise). Returns DDPMSchedulerOutput(prev_sample, pred_original_sample) or, with
        ``return_dict=False``, that tuple. Equivalent diffusers call:
        ``diffusers.DDPMScheduler.step(model_output, timestep, sample, generator, return_dict)``.
        vlfast extras (keyword-only): ``noise`` (B, C, *S) replaces the drawn noise;
        ``return_pred_original_sample=False`` skips writing pred_original_sample (None then; one tensor less
        to write); ``out`` (sample's shape and dtype, any strides; it may be ``sample`` itself) receives
        x_{t-1} and is returned as ``prev_sample`` (see ``vlfast.ops.fused_step``): a sampling loop that
        passes the same buffers each step allocates nothing (on the CPU, fresh outputs pay first-touch page
        faults); ``backend`` forces a backend.
        """
        check_sample(sample)
        variance, var_mode = None, self._var_mode
        if var_mode != ref.VAR_FIXED:
            if not isinstance(model_output, Tensor):
                raise TypeError(f"model_output must be a Tensor; got {type(model_output).__name__}")
            if sample.dim() < 2 or model_output.dim() != sample.dim() or model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={self.config.variance_type!r} needs model_output with twice the "
                                 f"sample's channels (noise and variance); got model_output of shape "
                                 f"{tuple(model_output.shape)} for a sample of shape {tuple(sample.shape)}")
            model_output, variance = torch.split(model_output, sample.shape[1], dim=1)
        timestep = self._host_timestep(timestep)
        device = sample.device
        coef = self._table(STEP_TABLE, device, table_dtype(sample.dtype))
        thresh = None
        if self._thresholding:
            thresh, timestep = self._thresholds(coef, model_output, timestep, sample)
        if noise is not None:
            check_like("noise", noise, sample)
        draw = noise is None and not (type(timestep) is int and timestep == 0)  # diffusers: no noise at t = 0
        if isinstance(generator, (list, tuple)):
            if draw:
                noise, draw = randn_per_sample(generator, sample), False
            generator = None
        prev, x0, _ = fused_step(sample, model_output, coef, timestep, variance=variance, noise=noise, thresh=thresh,
                                 clip=self._clip, var_mode=var_mode, draw_noise=draw, generator=generator,
                                 rng_state=self._rng_arg(device, draw), write_x0=return_pred_original_sample,
                                 out=out, backend=backend)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
