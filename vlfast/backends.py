"""Which implementation runs: the backend registry and its selection rules.

Backends: ``reference`` (plain PyTorch), ``triton`` (kernels/, on CUDA tensors,
or on CPU tensors with ``TRITON_INTERPRET=1``), ``cuda`` (the extension's CUDA
kernels) and ``cpp`` (the extension's CPU kernels).

Selection, first match wins: the ``backend=`` argument of a call, then
``with vlfast.use_backend(name):``, then the ``VLFAST_BACKEND`` environment
variable, then ``auto``: the first available backend of the device's priority
list (ordered by measured speed, see benchmarks/NOTES.md). ``auto`` never
raises; a forced backend that cannot run raises a ``RuntimeError`` listing
every reason. ``vlfast.last_backend(op)`` says which backend ran last.
"""

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("reference", "triton", "cuda", "cpp")
# Fastest first, per device type. On CUDA the extension's kernel goes first: its launch costs less
# host time than Triton's Python launcher, which dominates at diffusion-sized tensors (NOTES.md).
PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
# Per-op exceptions, from the H100 runs in benchmarks/NOTES.md: the Triton GroupNorm forward beat the
# CUDA one at every measured shape replayed in a CUDA graph and at most of them per call; for the
# backward the CUDA kernels won.
OP_PRIORITY = {"group_norm": {"cuda": ("triton", "cuda", "reference")},
               "group_norm_bwd": {"cuda": ("cuda", "triton", "reference")}}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Which backends implement each op (every op has the reference), and the extension op behind cuda/cpp.
OP_BACKENDS = {"ddpm_step": BACKENDS, "group_norm": BACKENDS, "group_norm_bwd": BACKENDS,
               "conv_transpose2d": ("reference", "triton")}
EXTENSION_OPS = {"ddpm_step": ("ddpm_step_kernel",), "group_norm": ("group_norm_fwd_kernel", "group_norm_bwd_kernel"),
                 "group_norm_bwd": ("group_norm_bwd_kernel",)}

_forced = contextvars.ContextVar("vlfast_backend", default=None)
_last: dict[str, str] = {}


def _check_name(name: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside the block: ``with vlfast.use_backend("triton"): ...``."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


@functools.cache
def extension():
    """The compiled extension ``vlfast._C``, or the reason it is missing (a str)."""
    try:
        return importlib.import_module("vlfast._C")
    except ImportError as e:
        return f"the C++ extension vlfast._C is not built ({e}); run `pip install --no-build-isolation -e .`"


@functools.cache
def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (`pip install triton`)"
    return None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _device_reasons(name: str, device_type: str) -> tuple[str, ...]:
    reasons = []
    if name == "triton":
        if (r := _triton_reason()) is not None:
            reasons.append(r)
        if device_type == "cpu" and not interpret_mode():
            reasons.append("triton runs CPU tensors only with TRITON_INTERPRET=1")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"triton does not run on {device_type} tensors")
    elif name in ("cuda", "cpp"):
        ext = extension()
        if isinstance(ext, str):
            reasons.append(ext)
        elif name == "cuda" and not getattr(ext, "WITH_CUDA", False):
            reasons.append("vlfast._C was built without CUDA kernels (torch without CUDA, or no nvcc)")
        want = "cuda" if name == "cuda" else "cpu"
        if device_type != want:
            reasons.append(f"the {name} backend runs {want} tensors, got {device_type}")
    return tuple(reasons)


@functools.cache
def _op_reasons(name: str, op: str) -> tuple[str, ...]:
    if name not in OP_BACKENDS.get(op, BACKENDS):
        return (f"vlfast has no {name} kernel for {op} yet",)
    if name in ("cuda", "cpp") and not isinstance(extension(), str):
        missing = [k for k in EXTENSION_OPS[op] if not hasattr(torch.ops.vlfast, k)]
        if missing:
            return (f"this build of vlfast._C lacks {', '.join(missing)}: rebuild it "
                    "(`pip install --no-build-isolation -e .`)",)
    return ()


def not_supported_reasons(name: str, device: torch.device, dtype: torch.dtype | None = None,
                          op: str | None = None) -> list[str]:
    """Every reason ``name`` cannot run ``op`` on tensors of this device and dtype (empty: it can)."""
    reasons = list(_device_reasons(name, device.type))
    if op is not None:
        reasons += _op_reasons(name, op)
    if name != "reference" and dtype is not None and dtype not in KERNEL_DTYPES:
        reasons.append(f"the {name} kernels take float32, float16 or bfloat16, got {dtype}")
    return reasons


def requested() -> str:
    """The backend asked for by context or environment ('auto' if none)."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get("VLFAST_BACKEND", "auto") or "auto")


def select(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None, *,
           kernels_pay: bool = True, prefer: tuple[str, ...] | None = None) -> str:
    """Resolve the backend for one call of ``op`` and remember it for :func:`last_backend`.

    For ``auto`` only (a forced backend always runs): ``kernels_pay=False`` says that for this input
    the reference (PyTorch's own kernel, e.g. cuDNN) is faster than vlfast's, so it is picked;
    ``prefer`` replaces the priority list where the caller measured another order for this input.
    """
    name = _check_name(backend) if backend is not None else requested()
    if name == "auto" and not kernels_pay:
        name = "reference"
    if name == "auto":
        order = prefer or OP_PRIORITY.get(op, {}).get(device.type) or PRIORITY.get(device.type, ("reference",))
        for cand in order:
            if not not_supported_reasons(cand, device, dtype, op):
                name = cand
                break
        else:
            name = "reference"
    else:
        reasons = not_supported_reasons(name, device, dtype, op)
        if reasons:
            raise RuntimeError(f"vlfast: backend {name!r} cannot run {op} here: " + "; ".join(reasons))
    _last[op] = name
    return name


def last_backend(op: str) -> str | None:
    """The backend that ran the last call of ``op`` in this process (None before the first)."""
    return _last.get(op)


def available(device_type: str, op: str | None = None) -> dict[str, list[str]]:
    """{backend: reasons it is unavailable} for a device type ('cpu' or 'cuda'), for one op or in general."""
    dev = torch.device(device_type)
    return {name: not_supported_reasons(name, dev, op=op) for name in BACKENDS}


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current one for the block: Triton launches on the current device."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
