"""DDPMScheduler: diffusers' DDPM sampler (Ho et al. 2020, Algorithm 2) with a one-kernel ``step``."""

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..ops.ddpm import check_sample, fused_step
from ..reference import ddpm as ref
from ._base import SchedulerBase, check_choice, check_like, spaced_timesteps, x0_columns

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
STEP_TABLE = "step"


@dataclass
class DDPMSchedulerOutput:
    """What :meth:`DDPMScheduler.step` returns: x_{t-1} and the (clipped) predicted x_0, both like ``sample``."""

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None


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

    Differences from diffusers:
      * ``variance_type="fixed_large_log"``: diffusers takes ``sqrt(log(beta_t))``, which is NaN; we use
        ``exp(0.5 * log(beta_t)) = sqrt(beta_t)``, so it samples exactly like ``"fixed_large"``.
      * Unknown ``beta_schedule`` / ``prediction_type`` / ``variance_type`` / ``timestep_spacing`` raise
        ``ValueError`` in the constructor (diffusers: ``NotImplementedError`` or an error at step time).
      * ``step`` takes ``noise=`` (like DDIM's ``variance_noise``), a per-sample (B,) ``timestep`` tensor, and
        gives NaN for a tensor timestep that is not in the schedule (diffusers: IndexError); an int one raises.
      * The random stream differs (in-kernel Philox instead of ``torch.randn``); ``model_output`` must have
        the dtype of ``sample``; learned variance types need the 2C-channel ``model_output``.
    """

    order = 1

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
        self._setup(locals(), BETA_SCHEDULES)
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self._schedule: Optional[frozenset] = None  # the timesteps step accepts, None: all
        self._var_mode = {"learned": ref.VAR_LEARNED, "learned_range": ref.VAR_LEARNED_RANGE}.get(variance_type,
                                                                                                 ref.VAR_FIXED)

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      timesteps: Optional[list] = None) -> None:
        """Set ``self.timesteps`` (descending int64, on ``device``) and rebuild the step table.

        Either ``num_inference_steps`` (spaced by ``config.timestep_spacing``, plus ``steps_offset``
        for "leading") or descending custom ``timesteps``. With ``device``, the table and the noise
        counter are put there now (needed before capturing a CUDA graph). Equivalent diffusers call:
        ``scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps)``.
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
        self._schedule = frozenset(array.tolist())
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
        return coef.float()

    def _check_in_schedule(self, timestep: int) -> None:
        """Host-side check of an int timestep against the schedule (tensors are checked on the device: NaN)."""
        if self._schedule is not None and self._uses_schedule() and timestep not in self._schedule:
            raise ValueError(f"timestep {timestep} is not in the schedule set by set_timesteps "
                             f"({len(self._schedule)} timesteps from {max(self._schedule)} to {min(self._schedule)})")

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: Optional[torch.Generator] = None,
             noise: Optional[Tensor] = None, return_dict: bool = True, *, return_pred_original_sample: bool = True,
             backend: Optional[str] = None):
        """x_{t-1} from the model output at ``timestep``, in one fused kernel.

        model_output: (B, C, *S), or (B, 2C, *S) for learned variance types (the second half is the
        predicted variance); sample: (B, C, *S) float32/float16/bfloat16, any dense layout; timestep: int,
        0-d or per-sample (B,) integer tensor (read on the device); noise: optional (B, C, *S) replacing
        the in-kernel draw from ``generator``. Returns DDPMSchedulerOutput(prev_sample, pred_original_sample)
        or, with ``return_dict=False``, that tuple. Equivalent diffusers call:
        ``diffusers.DDPMScheduler.step(model_output, timestep, sample, generator=generator)``.
        vlfast extras: ``return_pred_original_sample=False`` skips writing pred_original_sample (None
        then; one tensor less to write), ``backend`` forces a backend.
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
        if type(timestep) is int:
            self._check_in_schedule(timestep)
        device = sample.device
        coef = self._table(STEP_TABLE, device)
        thresh = None
        if self._thresholding:
            thresh, timestep = self._thresholds(coef, model_output, timestep, sample)
        if noise is not None:
            check_like("noise", noise, sample)
        draw = noise is None and not (type(timestep) is int and timestep == 0)  # diffusers: no noise at t = 0
        prev, x0, _ = fused_step(sample, model_output, coef, timestep, variance=variance, noise=noise, thresh=thresh,
                                 clip=self._clip, var_mode=var_mode, draw_noise=draw, generator=generator,
                                 rng_state=self._rng_arg(device, draw), write_x0=return_pred_original_sample,
                                 backend=backend)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
