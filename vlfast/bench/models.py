"""Whole models: vlfast-converted networks against eager PyTorch and torch.compile, forward and training step,
and a DDPM sampling loop through :func:`vlfast.sampling.sample` against diffusers' ``DDPMPipeline``.

Models (:data:`GPU_CONFIGS`; bf16 channels_last on a GPU):

- ``seed_unet``: :class:`vlfast.models.UNet` (3 -> 2 classes, base width 64, transposed-convolution up-convs,
  31M parameters), N8 3x256x256;
- ``ddpm_unet``: :class:`vlfast.models.DDPMUNet` with its defaults, DDPM's CIFAR-10 network (35.7M parameters),
  B64 3x32x32 with (B,) int64 timesteps;
- ``vae_decoder``: the decoder of :class:`vlfast.models.ConvVAE` (base width 64, 3 levels, 0.67M parameters),
  a 4x32x32 latent per image of 256x256, N8;
- ``sampling``: diffusers' ``UNet2DModel`` in DDPM's CIFAR-10 configuration (random weights), B64, 50 steps.

Providers of each model, for the forward (eval mode, ``torch.no_grad()``) and the training step (train mode:
``zero_grad(set_to_none=True)``, forward, loss, backward, an SGD step with momentum): ``eager``,
``torch.compile`` (of the module), ``vlfast`` (``vlfast.nn.convert`` of a copy, defaults), ``vlfast[all]``
(``convert(..., conv2d="all")``, forward only) and ``vlfast+compile`` (the converted copy compiled).
torch.compile of the training step only with ``VLFAST_BENCH_COMPILE_BWD=1`` (the backward graph more than
doubles each compile) or where a configuration asks for it; the rows' ``note`` says what was left out.
Sampling: ``diffusers DDPMPipeline loop`` (the pipeline called with ``output_type="pt"``, progress bar off: its
loop plus ``(x / 2 + 0.5).clamp(0, 1)``, two elementwise kernels), ``vlfast.sampling`` (the converted model,
vlfast's DDPMScheduler, one CUDA graph per step, captured anew in every call) and, on a GPU,
``vlfast.sampling eager`` (the same without the graph); each timed as whole loops (5 on a GPU, 3 on a CPU),
wall clock with a device synchronisation, after one untimed loop.

Checks, before anything is timed: each provider's forward output (for the training step: its first loss, from
the same weights and data) against a float32 copy of the eager model (TF32 off): relative L2 error at most
twice eager's own in the same dtype, or a floor (1e-3 float32, 2e-2 16-bit; training losses 2e-3 / 5e-2,
as compiled dropout draws other masks). A provider that disagrees or fails gets a row without a timing and
the reason. Sampling: the converted model's forward against the model's, and every loop's result finite.

FLOPs: those ``torch.utils.flop_counter.FlopCounterMode`` counts in the eager model (convolutions, matmuls,
attention), forward, forward + backward for the training step, times the steps for a sampling loop.

Cases run in order of importance (:data:`PLAN`), so that a run cut short by a time limit keeps the DDPM
U-Net's forward, its compiled rows and the sampling loop. On a CPU: the small :data:`CPU_CONFIGS` in float32.
"""

import copy
import os
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import models as vm
from ..nn import convert
from .common import Row, Timing, bench, compiled, format_table

OP = "models"
NAMES = ("seed_unet", "ddpm_unet", "vae_decoder", "sampling")
FORWARD, TRAIN = "forward", "train step"
PIPELINE = "diffusers DDPMPipeline loop"  # the sampling rows' baseline, as "eager" is the models'


class Config(NamedTuple):
    model: str                 # one of NAMES
    batch: int
    size: int                  # input resolution (the VAE decoder's: of the image it decodes)
    dtype: torch.dtype
    channels_last: bool
    kwargs: dict               # the model's constructor arguments
    compile: tuple = (FORWARD,)  # directions timed under torch.compile
    train: bool = True         # time the training step too
    steps: int = 50            # sampling: inference steps


# diffusers' UNet2DModel as google/ddpm-cifar10-32 configures it (35.7M parameters).
DIFFUSERS_CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256), norm_num_groups=32, norm_eps=1e-6,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
_SMALL_DIFFUSERS = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)
_SMALL_DDPM = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), groups=8, resolution=32)

BF16, FP32 = torch.bfloat16, torch.float32
GPU_CONFIGS = {
    "ddpm_unet": Config("ddpm_unet", 64, 32, BF16, True, {}),
    "sampling": Config("sampling", 64, 32, BF16, False, DIFFUSERS_CIFAR, compile=()),
    "seed_unet": Config("seed_unet", 8, 256, BF16, True, {"base": 64}),
    "vae_decoder": Config("vae_decoder", 8, 256, BF16, True, {"base": 64, "groups": 32}),
}
# Small versions for `make bench` on a CPU: the registry's small widths; torch.compile of the DDPM U-Net's
# forward only. On two quiet cores with a cold Inductor cache its two compiles took ~60 s, the seed U-Net's
# ~50 s and the VAE decoder's ~20 s more, against ~5 s for every other case together.
CPU_CONFIGS = {
    "ddpm_unet": Config("ddpm_unet", 1, 32, FP32, False, _SMALL_DDPM),
    "sampling": Config("sampling", 1, 16, FP32, False, _SMALL_DIFFUSERS, compile=(), steps=4),
    "seed_unet": Config("seed_unet", 1, 64, FP32, False, {"base": 8}, compile=()),
    "vae_decoder": Config("vae_decoder", 1, 64, FP32, False, {"base": 16, "groups": 8}, compile=()),
}
# The tests' sizes: every model, direction and provider in seconds (no torch.compile).
TINY_CONFIGS = {
    "ddpm_unet": Config("ddpm_unet", 1, 16, FP32, False, dict(ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                                              attn_resolutions=(8,), groups=4, resolution=16),
                        compile=()),
    "sampling": Config("sampling", 1, 8, FP32, False, {**_SMALL_DIFFUSERS, "sample_size": 8,
                                                       "block_out_channels": (8, 16), "norm_num_groups": 4},
                       compile=(), steps=2),
    "seed_unet": Config("seed_unet", 1, 32, FP32, False, {"base": 4}, compile=()),
    "vae_decoder": Config("vae_decoder", 1, 32, FP32, False, {"base": 8, "groups": 4}, compile=()),
}
# (model, direction, providers group), most important first: "base" = eager and vlfast, "compile" = torch.compile
# and vlfast+compile; sampling is one case.
PLAN = (("ddpm_unet", FORWARD, "base"), ("ddpm_unet", FORWARD, "compile"), ("sampling", None, None),
        ("seed_unet", FORWARD, "base"), ("ddpm_unet", TRAIN, "base"), ("seed_unet", TRAIN, "base"),
        ("seed_unet", FORWARD, "compile"), ("vae_decoder", FORWARD, "base"), ("vae_decoder", TRAIN, "base"),
        ("vae_decoder", FORWARD, "compile"), ("ddpm_unet", TRAIN, "compile"), ("seed_unet", TRAIN, "compile"),
        ("vae_decoder", TRAIN, "compile"))
REP_MS = 200  # per provider: a model call takes milliseconds, so more than the per-op benchmarks' 100
COMPILE_TRAIN_NOTE = "torch.compile of the training step not timed (VLFAST_BENCH_COMPILE_BWD=1 times it)"


def select(configs: dict, models=None, quick: bool = False, nchw: bool = False) -> dict:
    """The ``configs`` of ``models`` (default: all); ``quick``: no training step and at most 10 sampling steps;
    ``nchw``: the default memory format instead of channels_last."""
    out = {}
    for name, cfg in configs.items():
        if models and name not in models:
            continue
        if quick:
            cfg = cfg._replace(train=False, steps=min(cfg.steps, 10))
        out[name] = cfg._replace(channels_last=False) if nchw else cfg
    return out


def cases(device: torch.device, shapes=None, dtypes=None, providers=None, compile_=True, extra=None):
    """Yield (label, thunk) pairs in the order of :data:`PLAN`; each thunk returns the Rows of one model,
    direction and group of providers (each builds its model afresh from seed 0: the same weights).

    ``shapes``: {model name: :class:`Config`} to run instead of the device's defaults (e.g.
    :data:`TINY_CONFIGS`); ``dtypes``: run each configuration in these dtypes instead of its own;
    ``providers``: the provider names to time (eager, or the sampling baseline, always). ``extra`` is accepted
    for the common interface; there are no tuning probes here.
    """
    configs = shapes or (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    for name, direction, group in PLAN:
        cfg = configs.get(name)
        if cfg is None or (direction == TRAIN and not cfg.train):
            continue
        why_not = None if name == "sampling" else _not_compiled(cfg, direction, compile_)
        if group == "compile" and why_not:
            continue
        for dtype in dtypes or [cfg.dtype]:
            c = cfg._replace(dtype=dtype)
            label = _label(c, direction)
            if name == "sampling":
                yield label, (lambda c=c, lab=label: _sampling(device, c, lab, providers))
            else:
                note = why_not if group == "base" else None
                yield (f"{label} ({group})", lambda c=c, d=direction, g=group, lab=label, n=note:
                       _model_case(device, c, d, g, lab, providers, n))


def _not_compiled(cfg: Config, direction: str, compile_: bool) -> str | None:
    """Why torch.compile is not timed for this model and direction (None: it is)."""
    if not compile_:
        return "torch.compile not timed (--no-compile)"
    if direction in cfg.compile:
        return None
    if direction == TRAIN:
        return None if os.environ.get("VLFAST_BENCH_COMPILE_BWD") else COMPILE_TRAIN_NOTE
    return f"torch.compile of the {cfg.model} forward not timed in this device's configuration (Config.compile)"


def _label(cfg: Config, direction) -> str:
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(cfg.dtype, str(cfg.dtype))
    if cfg.model == "sampling":
        shape = (cfg.batch, cfg.kwargs.get("in_channels", 3), cfg.size, cfg.size)
        direction = f"{cfg.steps}-step loop"
    elif cfg.model == "vae_decoder":
        s = cfg.size >> cfg.kwargs.get("levels", 3)
        shape = (cfg.batch, cfg.kwargs.get("latent_channels", 4), s, s)
    else:
        shape = (cfg.batch, 3, cfg.size, cfg.size)
    return f"{cfg.model} {direction} {'x'.join(map(str, shape))} {dt}{' NHWC' if cfg.channels_last else ''}"


# ---------------------------------------------------------------- models, inputs, losses
def _build(cfg: Config, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, its forward's inputs, the training target, loss(output, target)), from seed 0."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, s = cfg.batch, cfg.size
    if cfg.model == "seed_unet":
        model = vm.UNet(3, 2, **cfg.kwargs)
        inputs = (torch.randn(n, 3, s, s, generator=g),)
        target = torch.randint(0, 2, (n, s, s), generator=g)

        def loss(out, y):
            return F.cross_entropy(out.float(), y)
    else:
        if cfg.model == "ddpm_unet":
            model = vm.DDPMUNet(**cfg.kwargs)
            inputs = (torch.randn(n, 3, s, s, generator=g), torch.randint(0, 1000, (n,), generator=g))
        elif cfg.model == "vae_decoder":
            vae = vm.ConvVAE(3, **cfg.kwargs)
            model, r = vae.decoder, s >> cfg.kwargs.get("levels", 3)
            inputs = (torch.randn(n, vae.latent_channels, r, r, generator=g),)
        else:
            raise ValueError(f"unknown model {cfg.model!r}; one of {NAMES}")
        target = torch.randn(n, 3, s, s, generator=g)

        def loss(out, y):
            return F.mse_loss(out.float(), y)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=fmt).eval()
    inputs = tuple(x.to(device=device, dtype=dtype).contiguous(memory_format=fmt) if x.is_floating_point()
                   else x.to(device) for x in inputs)
    return model, inputs, target.to(device), loss


def _variants(model, group: str, train: bool) -> dict:
    """{provider: factory of its module (a copy; compiled ones made only when called, after a Dynamo reset)}."""
    if group == "base":
        fns = {"eager": lambda: copy.deepcopy(model), "vlfast": lambda: convert(copy.deepcopy(model))}
        if not train:  # every conv through vlfast's Conv2d: forward only (its training step is slow on a CPU)
            fns["vlfast[all]"] = lambda: convert(copy.deepcopy(model), conv2d="all")
        return fns
    return {"torch.compile": lambda: _compiled_module(copy.deepcopy(model)),
            "vlfast+compile": lambda: _compiled_module(convert(copy.deepcopy(model)))}


def _compiled_module(module):
    """(compiled forward, the module whose parameters it trains)."""
    return compiled(module), module


# ---------------------------------------------------------------- checks
class _NoTF32:
    """float32 convolutions and matmuls in full precision on a GPU, for the reference."""

    def __enter__(self):
        self.old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.old


def _rel_err(got, want) -> float:
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _why(err: float, eager_err: float, floor: float) -> str | None:
    """Why an error is too large: more than twice eager's own in the same dtype and more than ``floor``."""
    if err == err and err <= max(floor, 2 * eager_err):  # err == err: not NaN
        return None
    return f"disagrees with the float32 model: relative L2 error {err:.3g} (eager's {eager_err:.3g})"


def _floor(dtype, train: bool) -> float:
    return (2e-3 if train else 1e-3) if dtype == torch.float32 else (5e-2 if train else 2e-2)


def _reference(model, inputs, target=None, loss=None):
    """The float32 model's forward output (``loss`` given: its first training loss), TF32 off."""
    ref = copy.deepcopy(model).float()
    args = tuple(x.float() if x.is_floating_point() else x for x in inputs)
    with _NoTF32():
        if loss is None:
            with torch.no_grad():
                return ref(*args).float()
        torch.manual_seed(1)
        return loss(ref.train()(*args), target).detach().float().reshape(1)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------- one model, direction and group
def _model_case(device, cfg: Config, direction: str, group: str, label: str, providers, note=None):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train = direction == TRAIN
    model, inputs, target, loss = _build(cfg, device, cfg.dtype)
    params = sum(p.numel() for p in model.parameters())
    want = _reference(model, inputs, target, loss if train else None)
    variants = _variants(model, group, train)
    with FlopCounterMode(display=False) as counter:  # eager's output and its FLOPs
        eager_err = _rel_err(_run_once(copy.deepcopy(model), direction, inputs, target, loss), want)
    flops = counter.get_total_flops()
    if providers:
        variants = {k: v for k, v in variants.items() if k in providers or k == "eager"}
    info = {"model": cfg.model, "direction": direction, "params": params}
    if note:
        info["note"] = note
    rows = []
    for name, make in variants.items():
        try:
            built = make()
            net, module = built if isinstance(built, tuple) else (built, built)
            fn = _forward(net, inputs) if not train else _train_step(net, module, inputs, target, loss)
            err = _rel_err(_first_output(fn, train), want)
            why = _why(err, eager_err, _floor(cfg.dtype, train))
            if train and not why:
                bad = [n for n, p in module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
                why = f"gradients not finite: {', '.join(bad[:3])}" if bad else None
        except Exception as e:  # noqa: BLE001 - a provider that fails is reported, not timed
            why, err = repr(e)[:300], None
        check = {"rel_err": err, "eager_rel_err": eager_err}
        if why:
            rows.append(Row(OP, label, str(cfg.dtype), name, None, flops=flops, extra={**info, **check, "error": why}))
            continue
        rows.append(_time(label, cfg.dtype, name, fn, device, flops, {**info, **check}))
        del fn, net, module, built
    return rows


def _forward(net, inputs):
    def fn():
        with torch.no_grad():
            return net(*inputs)
    return fn


def _train_step(net, module, inputs, target, loss):
    """One training step of ``net`` (``module``: whose parameters an SGD optimizer updates); returns the loss."""
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        value = loss(net(*inputs), target)
        value.backward()
        opt.step()
        return value.detach()
    return step


def _first_output(fn, train: bool):
    """The first call's output (training: the first loss), dropout seeded as for the reference."""
    torch.manual_seed(1)
    out = fn()
    return out.float().reshape(1) if train else out


def _run_once(module, direction, inputs, target, loss):
    """eager's output (training: its first loss), the baseline of the error rule."""
    if direction == TRAIN:
        return _first_output(_train_step(module, module, inputs, target, loss), True)
    return _first_output(_forward(module, inputs), False)


def _time(label, dtype, name, fn, device, flops, extra, timing=None):
    try:
        timing = timing or bench(fn, device, rep_ms=REP_MS)
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
        return Row(OP, label, str(dtype), name, None, flops=flops, extra={**extra, "error": repr(e)[:300]})
    tflops = flops / (timing.median * 1e-6) / 1e12
    return Row(OP, label, str(dtype), name, timing, flops=flops, extra={**extra, "tflops": tflops})


# ---------------------------------------------------------------- the sampling loop
def _sampling(device, cfg: Config, label: str, providers):
    try:
        import diffusers
    except ImportError as e:
        return [Row(OP, label, str(cfg.dtype), PIPELINE, None, extra={"error": f"needs diffusers: {e}"})]
    from ..sampling import sample
    from ..schedulers import DDPMScheduler

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = cfg.dtype
    torch.manual_seed(0)
    # nn.Module.to: diffusers' own `to` warns, for any dtype, about modules to keep in float32 (none here).
    unet = torch.nn.Module.to(diffusers.UNet2DModel(**cfg.kwargs), device=device, dtype=dtype).eval()
    fast = convert(copy.deepcopy(unet))
    shape = (cfg.batch, unet.config.in_channels, cfg.size, cfg.size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = torch.tensor(500, device=device)

    # The converted model's forward against the model's, both against float32 (TF32 off).
    want = _reference(_Sample(unet), (x, t))
    with torch.no_grad():
        eager_err = _rel_err(unet(x, t).sample, want)
        err = _rel_err(fast(x, t).sample, want)
        flops = cfg.steps * _flops(lambda: unet(x, t))
    info = {"model": "sampling", "direction": f"{cfg.steps}-step loop", "steps": cfg.steps,
            "params": sum(p.numel() for p in unet.parameters()), "rel_err": err, "eager_rel_err": eager_err}
    why = _why(err, eager_err, _floor(dtype, False))

    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def gen():
        return torch.Generator(device).manual_seed(0)

    def vlfast_loop(graph):
        return lambda: sample(fast, DDPMScheduler(), shape, generator=gen(), num_inference_steps=cfg.steps,
                              cuda_graph=graph, progress=False, device=device, dtype=dtype)
    fns = {PIPELINE: lambda: pipe(batch_size=cfg.batch, generator=gen(), num_inference_steps=cfg.steps,
                                  output_type="pt", return_dict=False)[0],
           "vlfast.sampling": vlfast_loop(True)}
    if device.type == "cuda":
        fns["vlfast.sampling eager"] = vlfast_loop(False)
    else:
        info["cuda_graph"] = "none on a CPU: vlfast.sampling runs its eager loop"
    if providers:
        fns = {k: v for k, v in fns.items() if k in providers or k == PIPELINE}
    rows = []
    for name, fn in fns.items():
        reason = why if name != PIPELINE else None
        if reason is None:
            try:
                out = fn()  # the untimed first loop: warm-up and check
                if not torch.isfinite(out.float()).all():
                    reason = "the sampled images are not finite"
            except Exception as e:  # noqa: BLE001
                reason = repr(e)[:300]
        if reason:
            rows.append(Row(OP, label, str(dtype), name, None, flops=flops, extra={**info, "error": reason}))
            continue
        timing = _time_loops(fn, device, reps=5 if device.type == "cuda" else 3)
        rows.append(_time(label, dtype, name, fn, device, flops, info, timing=timing))
    return rows


class _Sample(torch.nn.Module):
    """A diffusers model's ``.sample`` output as a plain tensor (for :func:`_reference`)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def _time_loops(fn, device, reps: int = 5):
    """Wall-clock time of whole loops, the device synchronised after each: median and 20th/80th percentiles."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    pick = lambda q: times[round(q * (len(times) - 1))]  # noqa: E731
    return Timing(pick(0.5), pick(0.2), pick(0.8))


# ---------------------------------------------------------------- the table
def models_table(rows) -> str:
    """Per model row: median and 20th-80th percentile in ms, TFLOP/s, speed-ups over the case's baseline
    (eager; the sampling rows: diffusers' DDPMPipeline loop) and over torch.compile."""
    base, comp = {}, {}
    for r in rows:
        if r.op == OP and r.timing:
            if r.provider in ("eager", PIPELINE):
                base[r.case] = r.timing.median
            elif r.provider == "torch.compile":
                comp[r.case] = r.timing.median
    lines = []
    for r in rows:
        if r.op != OP:
            continue
        if r.timing is None:
            lines.append([r.case, r.provider, "failed", "", "", "", ""])
            continue
        t = r.timing.median
        b, c = base.get(r.case), comp.get(r.case)
        lines.append([r.case, r.provider, f"{t / 1e3:.2f}", f"{r.timing.p20 / 1e3:.2f}-{r.timing.p80 / 1e3:.2f}",
                      f"{r.extra.get('tflops', 0):.3g}", f"{b / t:.2f}x" if b else "-", f"{c / t:.2f}x" if c else "-"])
    headers = ["case", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "vs base", "vs compile"]
    return format_table(headers, lines) + "\nvs base: against eager; sampling rows: against " + PIPELINE


def notes(rows) -> list[str]:
    """The distinct notes of the rows (what was not timed, and why)."""
    seen = []
    for r in rows:
        for key in ("note", "cuda_graph"):
            text = r.extra.get(key)
            if r.op == OP and text and text not in seen:
                seen.append(text)
    return seen
