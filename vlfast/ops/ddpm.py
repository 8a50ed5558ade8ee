"""The fused DDPM/DDIM update as a torch custom op (its Triton launcher: ``ddpm_triton.py``).

``torch.ops.vlfast.ddpm_step`` takes the backend as its last argument;
``torch.ops.vlfast.ddpm_step_out`` writes prev into ``out`` (declared mutated, so
``torch.compile`` handles it). The Python entry :func:`fused_step` checks the
inputs, settles the layout, draws a seed from the generator and picks the
backend; :data:`OP` declares the op to the shared dispatch layer
(``_dispatch.py``). The coefficient rows come from :mod:`vlfast.schedulers`;
the formula is in :mod:`vlfast.reference.ddpm`.
"""

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import tuning
from ..reference import ddpm as ref
from . import _dispatch, ddpm_triton
from ._common import check_out, check_tensor, is_same_tensor, shares_memory, write_out

_INF = float("inf")


# ---------------------------------------------------------------- the custom op
@torch.library.custom_op("vlfast::ddpm_step", mutates_args=("rng_state",))
def ddpm_step(sample: Tensor, model_output: Optional[Tensor], variance: Optional[Tensor], noise: Optional[Tensor],
              coef: Tensor, timesteps: Optional[Tensor], timestep: int, thresh: Optional[Tensor], clip: float,
              var_mode: int, draw_noise: bool, seed: int, offset: int, rng_state: Optional[Tensor],
              write_x0: bool, write_noise: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """One fused DDPM/DDIM step; see vlfast.reference.ddpm for the formula. Returns (prev, x0, noise)."""
    return _IMPLS[backend](sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip,
                           var_mode, draw_noise, seed, offset, rng_state, write_x0, write_noise)


def _extension_step(*args):
    return torch.ops.vlfast.ddpm_step_kernel(*args)


_IMPLS = {"triton": ddpm_triton.ddpm_step, "cuda": _extension_step, "cpp": _extension_step,
          "reference": ref.fused_step}


@ddpm_step.register_fake
def _(sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip, var_mode, draw_noise,
      seed, offset, rng_state, write_x0, write_noise, backend):
    has_noise = noise is not None or draw_noise
    return (torch.empty_like(sample), torch.empty_like(sample) if write_x0 else sample.new_empty((0,)),
            torch.empty_like(sample) if (write_noise and has_noise) else sample.new_empty((0,)))


@torch.library.custom_op("vlfast::ddpm_step_out", mutates_args=("rng_state", "out"))
def ddpm_step_out(sample: Tensor, model_output: Optional[Tensor], variance: Optional[Tensor],
                  noise: Optional[Tensor], coef: Tensor, timesteps: Optional[Tensor], timestep: int,
                  thresh: Optional[Tensor], clip: float, var_mode: int, draw_noise: bool, seed: int, offset: int,
                  rng_state: Optional[Tensor], write_x0: bool, write_noise: bool, backend: str,
                  out: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`ddpm_step` with prev written into ``out`` (sample's shape and dtype, any strides); returns
    (x0, noise)."""
    return _INTO[backend](out, sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip,
                          var_mode, draw_noise, seed, offset, rng_state, write_x0, write_noise)


@ddpm_step_out.register_fake
def _(sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip, var_mode, draw_noise,
      seed, offset, rng_state, write_x0, write_noise, backend, out):
    has_noise = noise is not None or draw_noise
    return (torch.empty_like(sample) if write_x0 else sample.new_empty((0,)),
            torch.empty_like(sample) if (write_noise and has_noise) else sample.new_empty((0,)))


def _writes_directly(out, sample, model_output, variance, noise, coef, timesteps, thresh, rng_state) -> bool:
    """Whether a kernel writing prev at sample's offsets can write ``out`` itself (its strides checked by the
    caller): each elementwise input (sample, model_output, variance, noise) is out itself or apart from it, and
    nothing else shares out's memory. Elsewhere the result goes through a fresh tensor."""
    if any(not is_same_tensor(out, t) and shares_memory(out, t) for t in (sample, model_output, variance, noise)):
        return False
    return not any(shares_memory(out, t) for t in (coef, timesteps, thresh, rng_state))


def _into_copy(impl):
    """prev into ``out`` by a fresh output and a copy (any strides; any memory shared with the inputs)."""
    def into(out, *args):
        prev, x0, z = impl(*args)
        out.copy_(prev)
        return x0, z
    return into


def _into_cpp(out, sample, *args):
    """The CPU kernel writes prev into ``out`` itself where out has sample's strides in dims 1.. (any batch
    stride) and :func:`_writes_directly`; otherwise through a fresh output."""
    if out.stride()[1:] == sample.stride()[1:] and _writes_directly(out, sample, *args[:5], args[6], args[12]):
        return torch.ops.vlfast.ddpm_step_out_kernel(sample, *args, out)
    return _into_copy(torch.ops.vlfast.ddpm_step_kernel)(out, sample, *args)


def _into_triton(out, sample, *args):
    """The Triton kernel writes prev into ``out`` itself where out has sample's strides and
    :func:`_writes_directly`; otherwise through a fresh output."""
    if out.stride() == sample.stride() and _writes_directly(out, sample, *args[:5], args[6], args[12]):
        _, x0, z = ddpm_triton.ddpm_step(sample, *args, out=out)
        return x0, z
    return _into_copy(ddpm_triton.ddpm_step)(out, sample, *args)


# The CUDA glue and the reference allocate their output: copied into out.
_INTO = {"triton": _into_triton, "cuda": _into_copy(_extension_step), "cpp": _into_cpp,
         "reference": _into_copy(ref.fused_step)}


# ---------------------------------------------------------------- checks and per-call arguments
def _dense(t: Tensor) -> bool:
    """Batch-major and dense: element r of sample n at offset n * per_sample + r."""
    if t.is_contiguous():
        return True
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _like(t: Optional[Tensor], sample: Tensor) -> Optional[Tensor]:
    """A checked ``t`` with sample's strides in dims 1.. (its own batch stride): as it is, or a copy."""
    if t is None or t.stride()[1:] == sample.stride()[1:] or t.numel() == 0:
        return t
    return torch.empty_like(sample).copy_(t)


def check_sample(sample) -> None:
    if not isinstance(sample, Tensor):
        raise TypeError(f"sample must be a Tensor, got {type(sample).__name__}")
    if not sample.is_floating_point():
        raise TypeError(f"sample must be a floating-point tensor, got {sample.dtype}")
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")


def timestep_args(timestep, batch: int, rows: int, device: torch.device):
    """(timesteps tensor or None, int timestep) for the op; host values are range-checked here."""
    if isinstance(timestep, Tensor):
        if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
            raise TypeError(f"timestep must hold integers, got {timestep.dtype}")
        if timestep.numel() != 1 and tuple(timestep.shape) != (batch,):
            raise ValueError(f"timestep must be an int, a 0-d tensor or of shape ({batch},), "
                             f"got {tuple(timestep.shape)}")
        if timestep.device.type == "cpu":
            if timestep.numel() == 1:
                timestep = int(timestep)
            else:
                if bool(((timestep < 0) | (timestep >= rows)).any()):
                    raise ValueError(f"timestep values must lie in [0, {rows}), got {timestep.tolist()}")
                return timestep.to(device=device, dtype=torch.int64, non_blocking=True), 0
        else:
            if timestep.device != device:
                raise ValueError(f"timestep is on {timestep.device} but sample is on {device}")
            return timestep.reshape(-1).to(torch.int64), 0
    if isinstance(timestep, bool) or not isinstance(timestep, int):
        try:
            timestep = int(timestep.__index__())
        except AttributeError:
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}") from None
    if not 0 <= timestep < rows:
        raise ValueError(f"timestep must lie in [0, {rows}), got {timestep}")
    return None, timestep


def seed_and_offset(generator, device: torch.device, rng_state):
    """A fresh (seed, offset) from ``generator`` (or the device's default), with no host-device sync."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing and rng_state is None:
        raise RuntimeError("drawing noise inside CUDA graph capture needs rng_state= (torch.zeros(2, "
                           "dtype=torch.int64, device=...) made before capture) so that replays draw fresh noise")
    if generator is None:
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                   else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    if capturing:  # offsets from 2**62 up: never those of an eager call, whose come from the generator
        seed = (generator.initial_seed() if generator.device.type == "cuda"
                else int(torch.randint(0, 2**62, (), generator=generator)))
        return seed & (2**63 - 1), 1 << 62
    if generator.device.type == "cuda":
        off = generator.get_offset()
        generator.set_offset(off + 4)
        return generator.initial_seed() & (2**63 - 1), off
    return int(torch.randint(0, 2**62, (), generator=generator)), 0


class Inputs(NamedTuple):
    """A checked call: the sample as the kernels take it (dense: a strided one is copied), the entry's arguments."""
    sample: Tensor
    copy: bool
    args: tuple  # fused_step's arguments, in order
    device: torch.device
    dtype: torch.dtype


class DdpmStep(_dispatch.Op):
    name = "ddpm_step"
    forward_backends = tuple(_IMPLS)
    extension_ops = {"forward": ("ddpm_step_kernel",)}
    values_only = frozenset({3, 7, 10, 11, 12})  # timestep, clip, generator, seed, offset: checked per call

    def check(self, sample, model_output, coef, timestep, variance, noise, thresh, clip, var_mode, draw_noise,
              generator, seed, offset, rng_state, write_x0, write_noise, out=None) -> Inputs:
        check_sample(sample)
        dense = sample if _dense(sample) else sample.contiguous()
        for name, t in (("model_output", model_output), ("variance", variance), ("noise", noise)):
            check_tensor(name, t, dense, "sample", shape=dense.shape)
        if var_mode != ref.VAR_FIXED and variance is None:
            raise ValueError("a learned variance type needs the predicted variance (model_output with 2C channels)")
        check_out(out, sample, list(sample.shape), False)
        args = (sample, model_output, coef, timestep, variance, noise, thresh, clip, var_mode, draw_noise, generator,
                seed, offset, rng_state, write_x0, write_noise, out)
        return Inputs(dense, dense is not sample, args, dense.device, dense.dtype)

    def limits(self, backend: str, direction: str, inputs: Inputs) -> list[str]:
        """The Triton launch puts one sample's blocks on the grid's second axis."""
        s = inputs.sample
        per_sample = s.numel() // s.shape[0] if s.shape[0] else 0
        if backend == "triton" and per_sample > ddpm_triton.max_per_sample(per_sample):
            return [f"one sample has {per_sample} elements; the Triton launch takes at most "
                    f"{ddpm_triton.max_per_sample(per_sample)} (its grid's second axis)"]
        return []

    def tuning_fields(self, inputs: Inputs) -> tuple[str, ...]:
        """One layout (the kernels see a dense sample) and the sample's elements."""
        return "dense", tuning.size_class(inputs.sample.numel(), "n")

    def rule(self, direction: str, inputs: Inputs) -> Optional[tuple[str, ...]]:
        """H100 (benchmarks/NOTES.md, 2026-11-26): on 16-bit tensors of millions of elements the Triton kernel
        took 75 µs against the CUDA kernel's 120 µs; below that, the CUDA kernel's cheaper launch wins."""
        s = inputs.sample
        if s.is_cuda and s.dtype in (torch.float16, torch.bfloat16) and s.numel() >= 1 << 20:
            return ("triton", "cuda", "reference")
        return None

    def plan(self, inputs: Inputs, choice: _dispatch.Choice, grad: bool):
        impl = _IMPLS[choice.forward]
        if impl is _extension_step:  # the extension's op itself: one Python layer less a call
            impl = torch.ops.vlfast.ddpm_step_kernel
        return functools.partial(_step, impl, _eager_into(_INTO[choice.forward]), inputs.copy)

    def trace(self, inputs: Inputs, choice: _dispatch.Choice):
        fwd = choice.forward
        return _step(lambda *args: ddpm_step(*args, fwd), lambda out, *args: ddpm_step_out(*args, fwd, out),
                     inputs.copy, *inputs.args)


OP = DdpmStep()


def _eager_into(into):
    """``into`` as an eager call runs it: as PyTorch's out= ops write (:func:`write_out`)."""
    return lambda out, *args: write_out(out, into, out, *args)


def _step(impl, into, copy: bool, sample, model_output, coef, timestep, variance, noise, thresh, clip, var_mode,
          draw_noise, generator, seed, offset, rng_state, write_x0, write_noise, out):
    """One call's per-call work (layouts, the timestep, the seed), then ``impl(*ddpm_step's arguments)``, or
    ``into(out, *those arguments)`` where ``out`` is given."""
    if copy:
        sample = sample.contiguous()
    if model_output is not None:
        model_output = _like(model_output, sample)
    if variance is not None or noise is not None:
        variance, noise = _like(variance, sample), _like(noise, sample)
    timesteps, t_int = timestep_args(timestep, sample.shape[0], coef.shape[0], sample.device)
    if coef.device != sample.device:
        coef = coef.to(sample.device)
    draw = draw_noise and noise is None
    if draw and seed is None:
        seed, offset = seed_and_offset(generator, sample.device, rng_state)
    clip = _INF if clip is None else float(clip)
    args = (sample, model_output, variance, noise, coef, timesteps, t_int, thresh, clip, var_mode, draw, seed or 0,
            offset, rng_state if draw else None, write_x0, write_noise)
    if out is None:
        prev, x0, z = impl(*args)
    else:
        x0, z = into(out, *args)
        prev = out
    return prev, (x0 if write_x0 else None), (z if write_noise and (draw or noise is not None) else None)


# ---------------------------------------------------------------- the Python entry
def fused_step(sample: Tensor, model_output: Optional[Tensor], coef: Tensor, timestep, *,
               variance: Optional[Tensor] = None, noise: Optional[Tensor] = None, thresh: Optional[Tensor] = None,
               clip: Optional[float] = None, var_mode: int = ref.VAR_FIXED, draw_noise: bool = False,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None, offset: int = 0,
               rng_state: Optional[Tensor] = None, write_x0: bool = True, write_noise: bool = False,
               out: Optional[Tensor] = None, backend: Optional[str] = None):
    """Checked entry to ``torch.ops.vlfast.ddpm_step``; returns ``(prev, x0 or None, noise or None)``.

    sample: (B, *S) float32/float16/bfloat16 (float64 runs the reference, in
    float64), any layout; model_output, variance, noise: like sample or None;
    coef: (R, 8) float32 rows (see vlfast.reference.ddpm; float64 rows for a float64 sample);
    timestep: int, 0-d tensor or (B,) integer tensor. With ``draw_noise`` and no ``noise``, Gaussian
    noise is drawn in the kernel from ``seed`` (default: drawn from ``generator``) and
    ``offset``, plus ``rng_state[0]`` when given (advanced by one per call on the
    device). ``out``: a tensor of sample's shape and dtype (any strides) that prev is written into and
    returned as (its version bumped, as PyTorch's out= ops do); it may be ``sample`` (or model_output,
    variance, noise) itself. The cpp and Triton kernels write it directly where it has sample's strides
    (cpp: in dims 1..) and shares no other memory with the inputs; otherwise, and on the cuda and
    reference backends, prev goes through a temporary. Equivalent PyTorch:
    ``vlfast.reference.ddpm.fused_step`` (then ``out.copy_(prev)``).
    """
    return OP(sample, model_output, coef, timestep, variance, noise, thresh, clip, var_mode, draw_noise, generator,
              seed, offset, rng_state, write_x0, write_noise, out, backend=backend)
