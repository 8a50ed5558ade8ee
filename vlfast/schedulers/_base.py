"""What DDPMScheduler and DDIMScheduler share: the config, the beta schedules, timestep spacing,
the per-device coefficient tables, dynamic thresholding, noise from a list of generators and the
fused forward noising."""

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops.ddpm import check_sample, fused_step, timestep_args
from ..reference import ddpm as ref

try:  # diffusers is optional; with it, pipelines save, load and convert our schedulers as they do theirs
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
    HAS_DIFFUSERS = True
except ImportError:
    from ._fallback import BaseOutput, ConfigMixin, SchedulerMixin, register_to_config
    HAS_DIFFUSERS = False

__all__ = ["BaseOutput", "ConfigMixin", "SchedulerMixin", "register_to_config", "HAS_DIFFUSERS", "SchedulerBase",
           "StepOutput"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
NOISE_TABLE = "add_noise"  # key of the forward-noising table
MAX_ETA_TABLES = 4  # DDIM tables (one per (eta, use_clipped_model_output)) kept per device and dtype
# diffusers' KarrasDiffusionSchedulers: the classes diffusers' DDPM and DDIM schedulers list as compatible.
KARRAS_SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                     "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                     "DPMSolverSDEScheduler", "EDMEulerScheduler"]
# x0 = (x - sqrt(1 - ab) m) / sqrt(ab) is +-inf where ab = 0 (the last timestep of rescale_betas_zero_snr), which
# diffusers then clips to +-clip_sample_range. Scaling x and m by an exact power of two instead keeps the sign of
# x - m exactly and the value finite: the clip gives diffusers' result, and no 0 * inf makes a NaN.
ZERO_SNR_SCALE = 2.0 ** 100


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> Tensor:
    """Betas that discretise ``alpha_bar`` (diffusers' function of the same name), float32."""
    if alpha_transform_type == "cosine":
        def alpha_bar_fn(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar_fn(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise ValueError(f"alpha_transform_type must be 'cosine' or 'laplace'; got {alpha_transform_type!r}")
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 as diffusers does."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, a_last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= a_last
    alphas_bar_sqrt *= a0 / (a0 - a_last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas, rescale_betas_zero_snr: bool) -> Tensor:
    """(num_train_timesteps,) float32 betas, bit-identical to diffusers' constructor."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(f"trained_betas must hold num_train_timesteps = {num_train_timesteps} values; "
                             f"got shape {tuple(betas.shape)}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    else:  # "sigmoid" (GeoDiff)
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float32))
        betas = betas * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps, steps_offset: int) -> np.ndarray:
    """Descending int64 timesteps of ``set_timesteps`` (Lin et al. 2023, Table 2), exactly as diffusers spaces them.

    ``num_inference_steps`` may be a float, as in diffusers ("leading" then takes ``arange(0, n)``, "linspace"
    raises numpy's TypeError).
    """
    n, T = num_inference_steps, num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"num_inference_steps must be a number; got {type(n).__name__}")
    if n > T:
        raise ValueError(
            f"`num_inference_steps`: {n} cannot be larger than `self.config.train_timesteps`:"
            f" {T} as the unet model trained with this scheduler can only handle maximal {T} timesteps.")
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {n}")
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def x0_columns(prediction_type: str, ab: Tensor) -> tuple[Tensor, Tensor]:
    """(A_X, A_M) float64 with x0 = A_X * x + A_M * m for each prediction type, ``ab`` = alphas_cumprod[t]."""
    if prediction_type == "epsilon":      # x0 = (x - sqrt(1 - ab) m) / sqrt(ab)
        zero = ab == 0                    # +-inf in diffusers: see ZERO_SNR_SCALE
        a_x = torch.where(zero, ZERO_SNR_SCALE, 1 / ab.sqrt())
        return a_x, torch.where(zero, -ZERO_SNR_SCALE * (1 - ab).sqrt(), -(1 - ab).sqrt() / ab.sqrt())
    if prediction_type == "sample":       # x0 = m
        return torch.zeros_like(ab), torch.ones_like(ab)
    return ab.sqrt(), -(1 - ab).sqrt()    # v_prediction: x0 = sqrt(ab) x - sqrt(1 - ab) m


def check_like(name: str, t, sample: Tensor) -> None:
    """A clear error naming ``name`` when ``t`` cannot stand beside ``sample``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor; got {type(t).__name__}")
    if t.shape != sample.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(sample.shape)} (the sample's)")


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The coefficient table's dtype for samples of ``dtype``: float64 for float64 (the reference runs it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn_tensor(shape: Sequence[int], generator=None, device=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """N(0, I) noise of ``shape`` drawn as diffusers' ``diffusers.utils.torch_utils.randn_tensor`` draws it.

    generator: None, a torch.Generator, or a list of them (one per sample: sample i is
    ``torch.randn((1, *shape[1:]), generator=generator[i])``; a list of one draws the whole shape from it).
    The noise is drawn on the generator's device (a CPU generator for a CUDA tensor: drawn on the CPU, then
    moved), so a seed gives the same x_T on every device. Returns ``shape`` on ``device`` in ``dtype``.
    """
    shape = tuple(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {shape[0]}. Make sure the batch size matches the length of "
                             "the generators.")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def randn_per_sample(generators, sample: Tensor) -> Tensor:
    """Noise like ``sample`` drawn from a list of generators as diffusers' ``randn_tensor`` draws it."""
    return randn_tensor(sample.shape, generators, sample.device, sample.dtype)


@dataclass
class StepOutput(BaseOutput):
    """What ``step`` returns: x_{t-1} and the (clipped) predicted x_0, both like ``sample``; diffusers'
    ``BaseOutput`` (or vlfast's equivalent): ``out.prev_sample``, ``out[0]``, ``out["prev_sample"]`` and
    ``out.to_tuple()`` all work, and a None ``pred_original_sample`` is no entry."""

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def __post_init__(self) -> None:
        # BaseOutput's own walks dataclasses.fields(): half the host cost of a small step's output.
        OrderedDict.__setitem__(self, "prev_sample", self.prev_sample)
        if self.pred_original_sample is not None:
            OrderedDict.__setitem__(self, "pred_original_sample", self.pred_original_sample)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _keep_recent(cache: dict, last_use, in_group) -> list:
    """Drop the entries of ``cache`` with ``in_group(key)`` beyond the MAX_ETA_TABLES of latest ``last_use(key)``;
    returns the keys dropped. Safe beside other threads' reads: it iterates over a snapshot and pops."""
    keys = sorted((k for k in list(cache) if in_group(k)), key=last_use)
    for k in keys[:-MAX_ETA_TABLES]:
        cache.pop(k, None)
    return keys[:-MAX_ETA_TABLES]


class SchedulerBase(SchedulerMixin, ConfigMixin):
    """What both schedulers share: diffusers' config machinery (or vlfast's own without diffusers: see
    ``_fallback.py``), the device tables, add_noise / add_noise_fresh / get_velocity."""

    order = 1
    _compatibles = list(KARRAS_SCHEDULERS)

    @classmethod
    def _get_compatibles(cls) -> list:
        """vlfast's two schedulers, then the diffusers classes diffusers' DDPM and DDIM schedulers list."""
        from .ddim import DDIMScheduler
        from .ddpm import DDPMScheduler
        ours = [DDPMScheduler, DDIMScheduler]
        return ours + [c for c in super()._get_compatibles() if c not in ours]

    def _setup(self, beta_schedules: tuple) -> None:
        """Validate the option values of the config and build the schedule (called by __init__)."""
        cfg = self.config
        if isinstance(cfg.num_train_timesteps, bool) or not isinstance(cfg.num_train_timesteps, int) \
                or cfg.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int; got {cfg.num_train_timesteps!r}")
        if cfg.trained_betas is None:
            check_choice("beta_schedule", cfg.beta_schedule, beta_schedules)
        check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                cfg.trained_betas, cfg.rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, cfg.num_train_timesteps)[::-1].copy().astype(np.int64))
        self._schedule: Optional[frozenset] = None  # the timesteps step accepts (DDPM after set_timesteps); None: all
        self._rng_state: Optional[Tensor] = None
        self._host: dict = {}       # key -> (T, 8) float64 table on the CPU
        self._device: dict = {}     # (key, device, dtype) -> that table on a device, in a dtype
        self._last_use: dict = {}   # (key, device, dtype) -> a count of _table calls at its latest use
        self._uses = 0
        # What step reads of the (frozen) config, looked up once.
        self._thresholding = bool(cfg.thresholding)
        self._clip = float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """Returns ``sample`` unchanged (DDPM and DDIM do not scale the model input)."""
        return sample

    def _host_timestep(self, timestep):
        """``timestep`` as step passes it on. Host values (int, numpy integer, CPU tensor) are checked against
        the schedule here (ValueError naming the timestep), a single one becomes an int; a device tensor (or
        any tensor under torch.compile) is read on the device, where a timestep out of the schedule gives NaN."""
        if isinstance(timestep, Tensor):
            if timestep.device.type != "cpu" or timestep.dtype.is_floating_point or timestep.dtype.is_complex \
                    or timestep.dtype == torch.bool or torch.compiler.is_compiling():
                return timestep  # a device tensor, or one that timestep_args rejects with a clear error
            values = timestep.reshape(-1).tolist()
            if len(values) == 1:
                timestep = values[0]
        elif isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            timestep = int(timestep)
            values = (timestep,)
        else:
            return timestep
        schedule = self._schedule
        if schedule is not None:
            for t in values:
                if t not in schedule:
                    raise ValueError(f"timestep {t} is not in the schedule set by set_timesteps ({len(schedule)} "
                                     f"timesteps from {max(schedule)} to {min(schedule)})")
        return timestep

    # ------------------------------------------------------------ coefficient tables
    def _build_table(self, key) -> Tensor:
        """(num_train_timesteps, 8) float64 rows for ``key`` (see :mod:`vlfast.schedulers`)."""
        if key != NOISE_TABLE:
            raise KeyError(key)
        ab = self.alphas_cumprod.double()
        coef = torch.zeros(ab.shape[0], ref.N_COEF, dtype=torch.float64)
        coef[:, ref.K_X] = ab.sqrt()
        coef[:, ref.SIGMA] = (1 - ab).sqrt()
        return coef

    def _host_table(self, key) -> Tensor:
        host = self._host.get(key)
        if host is None:
            host = self._host[key] = self._build_table(key)
            order = list(self._host)  # first built, first dropped: a host table is only read to move it
            _keep_recent(self._host, order.index, lambda k: isinstance(k, tuple))
        return host

    def _table(self, key, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """The table for ``key`` on ``device`` in ``dtype``: built once on the host, moved once per device.

        DDIM keeps the tables of its MAX_ETA_TABLES most recently used (eta, use_clipped_model_output)
        pairs per device and dtype.
        """
        slot = (key, device, dtype)
        self._uses += 1
        self._last_use[slot] = self._uses
        table = self._device.get(slot)
        if table is not None:
            return table
        if _capturing(device):
            raise RuntimeError("the scheduler's coefficient table is not on the device yet: call set_timesteps("
                               "device=...) and run one step with the same options before capturing a CUDA graph")
        table = self._device[slot] = self._host_table(key).to(device, dtype)
        for dropped in _keep_recent(self._device, lambda s: self._last_use.get(s, 0),
                                    lambda s: isinstance(s[0], tuple) and s[1:] == (device, dtype)):
            self._last_use.pop(dropped, None)
        return table

    def _new_schedule(self, device, keys) -> None:
        """After set_timesteps: rebuild the tables (those of ``keys`` now, so that a compiled step finds them
        built) and restart the noise counter; with a ``device``, put the counter and the tables of ``keys``
        there now (so that a CUDA graph can be captured).

        Device tables and the counter are updated in place: a captured CUDA graph keeps valid pointers
        and follows the new schedule.
        """
        self._host = {k: v for k, v in self._host.items() if k == NOISE_TABLE}
        for (key, _, _), table in list(self._device.items()):
            if key != NOISE_TABLE:
                table.copy_(self._host_table(key))
        for key in keys:
            self._host_table(key)
        if self._rng_state is not None:
            self._rng_state.zero_()
        if device is not None:
            dev = torch.empty(0, device=device).device  # normalised, e.g. cuda -> cuda:0
            if self._rng_state is None or self._rng_state.device != dev:
                self._rng_state = torch.zeros(2, dtype=torch.int64, device=dev)
            for key in keys:
                self._table(key, dev)

    def _rng_arg(self, device: torch.device, draw: bool) -> Optional[Tensor]:
        """The noise counter to pass to the kernel: only while capturing a CUDA graph or compiling.

        Eager calls draw from the generator alone (same seed, same noise); a captured or compiled
        step bakes its seed in, so the on-device counter is what makes each replay draw fresh noise.
        """
        if not draw or not (_capturing(device) or torch.compiler.is_compiling()):
            return None
        return self._rng_for(device)

    def _rng_for(self, device: torch.device) -> Tensor:
        """The (2,) int64 on-device noise counter the fused kernel advances (so CUDA graph replays differ)."""
        state = self._rng_state
        if state is None or state.device != device:
            if _capturing(device):
                raise RuntimeError("drawing noise inside CUDA graph capture: call set_timesteps(device=...) "
                                   "before capturing, so that the scheduler's noise counter is on the device")
            state = self._rng_state = torch.zeros(2, dtype=torch.int64, device=device)
        return state

    def _thresholds(self, coef: Tensor, model_output, timestep, sample: Tensor):
        """(B,) dynamic-thresholding scales s (Saharia et al. 2022) in coef's dtype, without host synchronisation.

        Equivalent to diffusers' ``_threshold_sample``: s = clamp(quantile(|x0|, ratio), 1, sample_max_value),
        x0 = A_X * x + A_M * m with the rows of ``timestep``. Returns (s, timestep in the form fused_step takes).
        """
        check_like("model_output", model_output, sample)
        batch = sample.shape[0]
        timesteps, t_int = timestep_args(timestep, batch, coef.shape[0], sample.device)
        rows = ref.gather_rows(coef, timesteps, t_int, batch)
        view = (batch,) + (1,) * (sample.dim() - 1)
        x0 = rows[:, ref.A_X].reshape(view) * sample.to(coef.dtype) \
            + rows[:, ref.A_M].reshape(view) * model_output.to(coef.dtype)
        s = torch.quantile(x0.abs().reshape(batch, -1), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value)
        return s, (timesteps if timesteps is not None else t_int)

    # ------------------------------------------------------------ forward process
    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * noise in one fused pass (the forward process q(x_t | x_0)).

        original_samples: (B, *S) float; noise: a float tensor that broadcasts with it (any float dtype);
        timesteps: int, or an integer tensor of 1 or B values of any shape (e.g. (B,) or (B, 1)). Returns the
        broadcast shape in the promoted dtype, as diffusers' ``scheduler.add_noise(x0, noise, t)`` does.
        """
        check_sample(original_samples)
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a Tensor; got {type(noise).__name__}")
        x, t = original_samples, timesteps
        if isinstance(t, Tensor) and t.dim() > 1:
            t = t.reshape(-1)  # (B, 1) and the like: diffusers flattens them
        n_t = t.shape[0] if isinstance(t, Tensor) and t.dim() == 1 else 1
        if noise.shape != x.shape or noise.dtype != x.dtype or n_t not in (1, x.shape[0]):
            # diffusers' broadcasting: coefficients of shape (n_t, 1, ..., 1), the dtype promoted
            shape = torch.broadcast_shapes(x.shape, noise.shape, (n_t,) + (1,) * (x.dim() - 1))
            dtype = torch.promote_types(x.dtype, noise.dtype)
            x, noise = x.to(dtype).expand(shape), noise.to(dtype).expand(shape)
        table = self._table(NOISE_TABLE, x.device, table_dtype(x.dtype))
        noisy, _, _ = fused_step(x, None, table, t, noise=noise, write_x0=False)
        return noisy

    def add_noise_fresh(self, original_samples: Tensor, timesteps,
                        generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Draw eps ~ N(0, I) in the kernel and return (sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps, eps).

        The noising of a training step (Ho et al. 2020, Algorithm 1) in one pass; shapes as in
        :meth:`add_noise`. Equivalent diffusers code: ``eps = torch.randn_like(x0, generator=...)``;
        ``scheduler.add_noise(x0, eps, t), eps`` (a different random stream: see vlfast.reference.philox).
        """
        check_sample(original_samples)
        device = original_samples.device
        table = self._table(NOISE_TABLE, device, table_dtype(original_samples.dtype))
        noisy, _, eps = fused_step(original_samples, None, table, timesteps, draw_noise=True, generator=generator,
                                   rng_state=self._rng_arg(device, True), write_x0=False,
                                   write_noise=True)
        return noisy, eps

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """v = sqrt(ab[t]) * noise - sqrt(1 - ab[t]) * sample, in plain PyTorch (Salimans & Ho 2022).

        sample, noise: (B, *S) (or broadcasting as in diffusers); timesteps: 0-d or (B,) (or (B, 1), ...)
        integer tensor. Computed in float32 (float64 for float64) and rounded once to the promoted dtype.
        Equivalent diffusers call: ``scheduler.get_velocity(sample, noise, timesteps)``.
        """
        dtype = torch.promote_types(sample.dtype, noise.dtype)
        table = self._table(NOISE_TABLE, sample.device, table_dtype(dtype))
        t = torch.as_tensor(timesteps).to(sample.device)
        view = (-1,) + (1,) * (sample.dim() - 1)
        a, s = table[t, ref.K_X].flatten().reshape(view), table[t, ref.SIGMA].flatten().reshape(view)
        return (a * noise.to(table.dtype) - s * sample.to(table.dtype)).to(dtype)
