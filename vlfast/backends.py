"""Which implementation runs: the backend registry, what each backend supports, and the one selection rule.

Backends: ``reference`` (plain PyTorch), ``triton`` (kernels/, on CUDA tensors, or on CPU tensors with
``TRITON_INTERPRET=1``), ``cuda`` (the extension's CUDA kernels) and ``cpp`` (the extension's CPU kernels).

The request, first match wins: the ``backend=`` argument of a call, then ``with vlfast.use_backend(name):``,
then the ``VLFAST_BACKEND`` environment variable (read at the first call), then ``"auto"``. A request
names the forward's and the backward's backend, the same way for every op:

- ``"auto"``: each direction takes the first backend of the op's order for these inputs (fastest first:
  the card's table of measured orders (:mod:`vlfast.tuning`), else the op's hand-written rule, else the
  device's :data:`PRIORITY`) that can run them; never raises.
- ``"X"``: the forward runs on X (a ``RuntimeError`` listing every reason where X cannot); the backward
  runs on X where X has a backward for these inputs, else as under ``auto``.
- ``"X+Y"``: the forward on X and the backward on Y, both forced.

What a backend can run is answered in one place, :func:`not_supported_reasons`, from the inputs: the
device, the dtype, the build, and every input-dependent limit the op declares (index widths, grid sizes,
geometries a kernel does not take). Under ``torch.compile`` the choice is made while tracing; the
compiled code is guarded on the innermost ``use_backend`` request open in the process (a recompile per
distinct request) and a forced backend that cannot run raises while tracing. ``vlfast.last_backend(op)``
says which backend ran the forward of the last call of ``op``, ``last_backend(op, "backward")`` which one
its backward was given.
"""

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("reference", "triton", "cuda", "cpp")
DIRECTIONS = ("forward", "backward")
# Fastest first, per device type, where an op declares no measured order of its own. On CUDA the
# extension's kernel goes first: its launch costs less host time than Triton's Python launcher, which
# dominates at diffusion-sized tensors (benchmarks/NOTES.md).
PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The op declarations (vlfast.ops._dispatch.Op), registered by name as their modules load.
OPS: dict = {}

_forced = contextvars.ContextVar("vlfast_backend", default=None)
# The innermost use_backend block's request, process-wide (None outside any): compiled code reads it,
# so torch.compile guards on its value and recompiles when it changes (see select).
_compile_request: str | None = None
_last: dict[tuple[str, str], str] = {}
# vlfast.tuning.recording's recorders, open now: each sees every call's report.
recorders: list = []


def _check_name(name: str) -> str:
    """A valid request: "auto", a backend, or "forward+backward"."""
    parts = name.split("+") if isinstance(name, str) else [name]
    if not (name == "auto" or (len(parts) <= 2 and all(p in BACKENDS for p in parts))):
        raise ValueError(f"backend must be 'auto', one of {BACKENDS}, or 'forward+backward' (e.g. 'triton+cuda'), "
                         f"got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside the block: ``with vlfast.use_backend("triton"): ...``."""
    global _compile_request
    token = _forced.set(_check_name(name))
    outer, _compile_request = _compile_request, name
    try:
        yield
    finally:
        _forced.reset(token)
        _compile_request = outer


def requested() -> str:
    """The backend asked for by context or environment ('auto' if none)."""
    forced = _forced.get()
    return forced if forced is not None else _environment_request()


@functools.cache
def _environment_request() -> str:
    """``VLFAST_BACKEND``, read once (at the first call of an op): an environment read costs more host time
    than a small call's whole dispatch."""
    return _check_name(os.environ.get("VLFAST_BACKEND", "auto") or "auto")


# ---------------------------------------------------------------- what a backend supports
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
def _op_reasons(name: str, op: str, direction: str) -> tuple[str, ...]:
    """What the op's declaration and this build say, whatever the inputs."""
    decl = OPS[op]
    if name not in decl.backends(direction):
        return (f"vlfast has no {name} kernel for the {direction} of {op}",)
    if name in ("cuda", "cpp") and not isinstance(extension(), str):
        key = "CUDA" if name == "cuda" else "CPU"
        needed = decl.extension_ops.get(direction, ())
        needed = needed.get(name, ()) if isinstance(needed, dict) else needed  # per backend where they differ
        missing = [k for k in needed if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vlfast::{k}", key)]
        if missing and (name == "cpp" or getattr(extension(), "WITH_CUDA", False)):
            how = ("left out of this build (VLFAST_SKIP_CUDA) or the build is stale" if name == "cuda"
                   else "missing: the build is stale")
            return (f"vlfast._C's {key} kernels for {', '.join(missing)} are {how}; rebuild it "
                    "(`pip install --no-build-isolation -e .`)",)
    return ()


def _reasons(name: str, op: str | None, direction: str, device: torch.device | None,
             dtype: torch.dtype | None) -> list[str]:
    """What the device, the build, the op's declaration and the dtype say, whatever the rest of the inputs."""
    reasons = list(_device_reasons(name, torch.device(device).type)) if device is not None else []
    if op is not None:
        reasons += _op_reasons(name, op, direction)
    if name != "reference" and dtype is not None and dtype not in KERNEL_DTYPES:
        reasons.append(f"the {name} kernels take float32, float16 or bfloat16, got {dtype}")
    return reasons


def not_supported_reasons(name: str, op: str | None = None, inputs=None, direction: str = "forward", *,
                          device: torch.device | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Every reason backend ``name`` cannot run ``direction`` of ``op`` on ``inputs`` (empty: it can).

    ``inputs``: what the op's checks made of a call's arguments (``vlfast.ops.<op>.OP.check(...)``); it
    carries the device and dtype. Without it, ``device`` (and ``dtype``) give the answer for any input on
    that device: the device, the build and the op's declaration, but no input-dependent limit.
    """
    if inputs is None:
        return _reasons(name, op, direction, device, dtype)
    reasons = _reasons(name, op, direction, inputs.device, inputs.dtype)
    if op is not None and name in OPS[op].backends(direction):
        reasons += OPS[op].limits(name, direction, inputs)
    return reasons


# ---------------------------------------------------------------- the selection rule
def _choose(op: str, direction: str, device: torch.device, dtype: torch.dtype, backend: str | None,
            order: tuple[str, ...] | None, limits: tuple) -> str:
    """The backend of one direction of one call (see the module docstring), recorded for last_backend.

    ``order``: the op's fastest-first order for these inputs (None: the device's); ``limits``:
    ((backend, reasons), ...) from the op's input-dependent checks, worked out by the caller so that this
    function sees plain values only (it runs once, at trace time, under torch.compile).
    """
    request = _check_name(backend) if backend is not None else requested()
    limit = dict(limits)
    decl = OPS[op]

    def reasons(name):
        return _reasons(name, op, direction, device, dtype) + list(limit.get(name, ()))

    fwd, _, bwd = request.partition("+")
    forced = fwd if direction == "forward" else bwd or fwd
    if forced != "auto" and direction == "backward" and not bwd and reasons(forced):
        forced = "auto"  # "X": the backward follows the forward where X has one for these inputs
    if forced == "auto":
        name = "reference"
        for cand in order or PRIORITY.get(device.type, ("reference",)):
            if cand in decl.backends(direction) and not reasons(cand):
                name = cand
                break
    else:
        why = reasons(forced)
        if why:
            raise RuntimeError(f"vlfast: backend {forced!r} cannot run the {direction} of {op} here: "
                               + "; ".join(why))
        name = forced
    _last[(op, direction)] = name
    return name


@torch.compiler.assume_constant_result
def _choose_at_trace(*args) -> str:
    """:func:`_choose` while torch.compile traces, as a constant: the name, or the error's text prefixed by
    "!" (raised by :func:`select` in the traced code, so that the user sees the RuntimeError itself)."""
    try:
        return _choose(*args)
    except RuntimeError as e:
        return "!" + str(e)


def select(op: str, direction: str, inputs, backend: str | None = None) -> str:
    """The backend for ``direction`` of one call of ``op`` on ``inputs`` (what its checks made of the call's
    arguments), by the rule of the module docstring; recorded for :func:`last_backend`. Under
    ``torch.compile`` the choice is made once, while tracing, and baked into the graph."""
    decl = OPS[op]
    limits = tuple((name, tuple(decl.limits(name, direction, inputs))) for name in decl.backends(direction))
    order = decl.order(direction, inputs)
    if torch.compiler.is_compiling():
        # A guarded read: the compiled graph is reused only under the same use_backend request.
        if backend is None and _compile_request is not None:
            backend = _compile_request
        name = _choose_at_trace(op, direction, inputs.device, inputs.dtype, backend, order, limits)
        if name.startswith("!"):
            raise RuntimeError(name[1:])
        return name
    return _choose(op, direction, inputs.device, inputs.dtype, backend, order, limits)


def last_backend(op: str, direction: str = "forward") -> str | None:
    """The backend that ran ``direction`` of the last call of ``op`` in this process (None before the first);
    ``last_backend(op, "key")``: that call's tuning key (:mod:`vlfast.tuning`)."""
    return _last.get((op, direction))


def report(choices: dict) -> None:
    """Record {(op, direction): backend} (and {(op, "key"): tuning key}) for last_backend (a plan's choices)
    and for any open :func:`vlfast.tuning.recording`."""
    _last.update(choices)
    for rec in recorders:
        rec.add(choices)


def available(device_type: str, op: str | None = None, direction: str = "forward") -> dict[str, list[str]]:
    """{backend: reasons it is unavailable} for a device type ('cpu' or 'cuda'), for one op or in general."""
    dev = torch.device(device_type)
    return {name: not_supported_reasons(name, op, None, direction, device=dev) for name in BACKENDS}


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current one for the block: Triton launches on the current device."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
