"""What DDPMScheduler and DDIMScheduler share: the config, the beta schedules, timestep spacing,
the per-device coefficient tables, dynamic thresholding and the fused forward noising."""

import inspect
import math
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.ddpm import check_sample, fused_step, timestep_args
from ..reference import ddpm as ref

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
NOISE_TABLE = "add_noise"  # key of the forward-noising table


class FrozenConfig(dict):
    """The constructor arguments, read-only: ``config.clip_sample`` or ``config["clip_sample"]``.

    A ``dict`` like diffusers' ``FrozenDict``, so ``diffusers.DDIMScheduler.from_config(ours.config)`` works too.
    """

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        object.__setattr__(self, "__dict__", self)  # config.name is a plain attribute lookup (fast)

    def __getattr__(self, name):
        raise AttributeError(f"config has no entry {name!r}")

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; make a new scheduler with from_config(config, **changes)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):
        return FrozenConfig, (dict(self),)


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
    """Descending int64 timesteps of ``set_timesteps`` (Lin et al. 2023, Table 2), exactly as diffusers spaces them."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int; got {type(num_inference_steps).__name__}")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
            f" {num_train_timesteps} as the unet model trained with this scheduler can only handle"
            f" maximal {num_train_timesteps} timesteps.")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {num_inference_steps}")
    n, T = int(num_inference_steps), num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def x0_columns(prediction_type: str, ab: Tensor) -> tuple[Tensor, Tensor]:
    """(A_X, A_M) float64 with x0 = A_X * x + A_M * m for each prediction type, ``ab`` = alphas_cumprod[t]."""
    if prediction_type == "epsilon":      # x0 = (x - sqrt(1 - ab) m) / sqrt(ab)
        return 1 / ab.sqrt(), -(1 - ab).sqrt() / ab.sqrt()
    if prediction_type == "sample":       # x0 = m
        return torch.zeros_like(ab), torch.ones_like(ab)
    return ab.sqrt(), -(1 - ab).sqrt()    # v_prediction: x0 = sqrt(ab) x - sqrt(1 - ab) m


def check_like(name: str, t, sample: Tensor) -> None:
    """A clear error naming ``name`` when ``t`` cannot stand beside ``sample``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor; got {type(t).__name__}")
    if t.shape != sample.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(sample.shape)} (the sample's)")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class SchedulerBase:
    """Config handling, device caches, add_noise / add_noise_fresh / get_velocity of both schedulers."""

    order = 1
    _param_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._param_names = tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def _setup(self, args: dict, beta_schedules: tuple) -> None:
        """Store the config, validate the option values and build the schedule (called by __init__)."""
        self.config = FrozenConfig({k: args[k] for k in self._param_names})
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
        self._rng_state: Optional[Tensor] = None
        self._host: dict = {}      # key -> (T, 8) float32 table on the CPU
        self._device: dict = {}    # (key, device) -> the same table on that device
        # What step reads of the (frozen) config, looked up once.
        self._thresholding = bool(cfg.thresholding)
        self._clip = float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else None

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """A scheduler from a config dict (ours or diffusers', e.g. ``diffusers_scheduler.config``).

        Keys that are not constructor arguments (``_class_name``, ``_diffusers_version``, options of
        other schedulers) are ignored; ``kwargs`` override the config. Equivalent diffusers call:
        ``diffusers.<Same>Scheduler.from_config(config, **kwargs)``.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            inner = getattr(config, "config", None)
            if not isinstance(inner, Mapping):
                raise TypeError(f"config must be a dict such as scheduler.config; got {type(config).__name__}")
            config = inner
        args = {k: v for k, v in config.items() if k in cls._param_names}
        unknown = sorted(set(kwargs) - set(cls._param_names))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_config got unknown arguments {unknown}")
        args.update(kwargs)
        return cls(**args)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """Returns ``sample`` unchanged (DDPM and DDIM do not scale the model input)."""
        return sample

    # ------------------------------------------------------------ coefficient tables
    def _build_table(self, key) -> Tensor:
        """(num_train_timesteps, 8) float32 rows for ``key`` (see :mod:`vlfast.schedulers`)."""
        if key != NOISE_TABLE:
            raise KeyError(key)
        ab = self.alphas_cumprod.double()
        coef = torch.zeros(ab.shape[0], ref.N_COEF, dtype=torch.float64)
        coef[:, ref.K_X] = ab.sqrt()
        coef[:, ref.SIGMA] = (1 - ab).sqrt()
        return coef.float()

    def _host_table(self, key) -> Tensor:
        host = self._host.get(key)
        if host is None:
            host = self._host[key] = self._build_table(key)
        return host

    def _table(self, key, device: torch.device) -> Tensor:
        """The table for ``key`` on ``device``: built once on the host, moved once per device."""
        table = self._device.get((key, device))
        if table is not None:
            return table
        if _capturing(device):
            raise RuntimeError("the scheduler's coefficient table is not on the device yet: call set_timesteps("
                               "device=...) and run one step with the same options before capturing a CUDA graph")
        table = self._device[(key, device)] = self._host_table(key).to(device)
        return table

    def _new_schedule(self, device, keys) -> None:
        """After set_timesteps: rebuild the tables and restart the noise counter; with a ``device``, put
        the counter and the tables of ``keys`` there now (so that a CUDA graph can be captured).

        Device tables and the counter are updated in place: a captured CUDA graph keeps valid pointers
        and follows the new schedule.
        """
        self._host = {k: v for k, v in self._host.items() if k == NOISE_TABLE}
        for (key, _), table in self._device.items():
            if key != NOISE_TABLE:
                table.copy_(self._host_table(key))
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
        """(B,) float32 dynamic-thresholding scales s (Saharia et al. 2022), without host synchronisation.

        Equivalent to diffusers' ``_threshold_sample``: s = clamp(quantile(|x0|, ratio), 1, sample_max_value),
        x0 = A_X * x + A_M * m with the rows of ``timestep``. Returns (s, timestep in the form fused_step takes).
        """
        check_like("model_output", model_output, sample)
        batch = sample.shape[0]
        timesteps, t_int = timestep_args(timestep, batch, coef.shape[0], sample.device)
        rows = ref.gather_rows(coef, timesteps, t_int, batch)
        view = (batch,) + (1,) * (sample.dim() - 1)
        x0 = rows[:, ref.A_X].reshape(view) * sample.float() + rows[:, ref.A_M].reshape(view) * model_output.float()
        s = torch.quantile(x0.abs().reshape(batch, -1), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value)
        return s, (timesteps if timesteps is not None else t_int)

    # ------------------------------------------------------------ forward process
    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * noise in one fused pass (the forward process q(x_t | x_0)).

        original_samples, noise: (B, *S) float; timesteps: int, 0-d or (B,) integer tensor.
        Returns (B, *S) like original_samples. Equivalent diffusers call: ``scheduler.add_noise(x0, noise, t)``.
        """
        check_sample(original_samples)
        check_like("noise", noise, original_samples)
        table = self._table(NOISE_TABLE, original_samples.device)
        noisy, _, _ = fused_step(original_samples, None, table, timesteps, noise=noise, write_x0=False)
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
        table = self._table(NOISE_TABLE, device)
        noisy, _, eps = fused_step(original_samples, None, table, timesteps, draw_noise=True, generator=generator,
                                   rng_state=self._rng_arg(device, True), write_x0=False,
                                   write_noise=True)
        return noisy, eps

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """v = sqrt(ab[t]) * noise - sqrt(1 - ab[t]) * sample, in plain PyTorch (Salimans & Ho 2022).

        sample, noise: (B, *S); timesteps: 0-d or (B,) integer tensor. Returns (B, *S) like sample.
        Equivalent diffusers call: ``scheduler.get_velocity(sample, noise, timesteps)``.
        """
        ab = self._table(NOISE_TABLE, sample.device).to(sample.dtype)
        t = torch.as_tensor(timesteps).to(sample.device)
        view = (-1,) + (1,) * (sample.dim() - 1)
        return ab[t, ref.K_X].flatten().reshape(view) * noise - ab[t, ref.SIGMA].flatten().reshape(view) * sample
