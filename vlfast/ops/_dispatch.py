"""The machinery every op shares, written once: the op declaration, the eager fast path, the plan cache,
the backend choice of both directions and the training path.

An op is a subclass of :class:`Op` declaring

- ``name``, ``forward_backends`` / ``backward_backends`` (the backends with a kernel for each direction;
  ``backward_backends = ()`` for an op without gradients) and ``extension_ops`` (the ``vlfast._C`` ops
  its cuda/cpp backends call, per direction);
- ``check(*args) -> inputs``: the argument checks (errors name the argument) and what the kernels need
  to know of the call (an object with at least ``device`` and ``dtype``);
- ``limits(backend, direction, inputs) -> [reason]``: every input-dependent limit of its kernels (index
  widths, grid sizes, unsupported geometries), which :func:`vlfast.backends.not_supported_reasons` adds
  to the device's and the build's;
- ``order(direction, inputs)``: auto's fastest-first order for these inputs where it was measured to
  differ from the device's default (None otherwise);
- ``plan(inputs, choice, grad) -> run``: the eager call, with everything worked out from the metadata
  done once (``run`` takes the entry's arguments and only allocates and launches);
- ``trace(inputs, choice)``: the call under ``torch.compile``, through the op's torch custom ops.

:meth:`Op.__call__` then does the rest the same way for every op: at a geometry seen before (shapes,
strides, dtypes, devices and the non-tensor arguments; whether gradients are recorded; the backend
request), eager calls skip the checks and the planning and run the cached plan; otherwise it checks,
selects the forward's backend and, where gradients are recorded, the backward's
(:func:`vlfast.backends.select`), plans and caches. :func:`autograd` makes the eager training path and
the custom op's ``register_autograd`` from one ``setup_context`` and one ``backward``.
"""

import threading
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from . import _overrides

PLAN_CACHE_SIZE = 256


class Choice(NamedTuple):
    """The backends of one call: the forward's, and the backward's (None where no gradient is recorded)."""
    forward: str
    backward: Optional[str] = None

    def op_arg(self) -> str:
        """The backend argument of the op's custom ops: "X", or "X+Y" when a backward was chosen."""
        return self.forward if self.backward is None else f"{self.forward}+{self.backward}"


class PlanCache:
    """A bounded map from call geometry to plan, safe to use from several threads: reads are one dict
    lookup (atomic in CPython, no lock on the hot path); writes take a lock and, past ``size`` plans,
    drop the oldest (first made: a model's few geometries are all made early and stay)."""

    def __init__(self, size: int = PLAN_CACHE_SIZE):
        self.size = size
        self._plans: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        return self._plans.get(key)

    def put(self, key, plan) -> None:
        with self._lock:
            self._plans.pop(key, None)
            self._plans[key] = plan
            while len(self._plans) > self.size:
                del self._plans[next(iter(self._plans))]

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


_SCALARS = frozenset({int, float, bool, str, type(None)})
_SEQUENCES = frozenset({list, tuple, torch.Size})
_TENSORS = frozenset({Tensor, torch.nn.Parameter})


def _geometry(values, values_only: frozenset = frozenset()) -> tuple[Optional[tuple], bool]:
    """(key, any tensor requires grad) of these arguments. The key is everything an op's checks, backend
    choice and plan may depend on: tensors by shape, strides, dtype and device; plain scalars, strings and
    sequences of them by type and value; positions in ``values_only`` (per-call values such as eps or a
    seed) by type alone. It is None where an argument is anything else (a tensor subclass, an object):
    such calls take the checked path. Written for speed: it runs on every eager call."""
    parts = []
    append = parts.append
    requires_grad = False
    i = -1
    for v in values:
        i += 1
        if v is None:  # the commonest argument of all (absent optional tensors)
            append(None)
            continue
        t = type(v)
        if t in _TENSORS:
            append((v.shape, v.stride(), v.dtype, v.device))
            requires_grad = requires_grad or v.requires_grad
        elif i in values_only:
            append(t)
        elif t in _SCALARS:
            append((t, v))
        elif t in _SEQUENCES:
            inner = _geometry(v)[0]
            if inner is None:
                return None, grad_recorded(values)
            append((t, inner))
        else:
            return None, grad_recorded(values)
    return tuple(parts), requires_grad


def grad_recorded(values) -> bool:
    """Whether autograd records this call: grad mode on and some tensor argument requires grad."""
    return torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in values)


class Plan(NamedTuple):
    report: dict            # {(op, direction): backend} for last_backend
    run: Callable[..., Any]  # run(*entry arguments) -> the entry's result


class Op:
    """An op's declaration (see the module docstring); one instance per op, called by its Python entry."""

    name: str = ""
    forward_backends: tuple[str, ...] = backends.BACKENDS
    backward_backends: tuple[str, ...] = ()
    extension_ops: dict = {}
    values_only: frozenset = frozenset()  # entry argument positions that never change the plan

    def __init__(self):
        self.plans = PlanCache()
        backends.OPS[self.name] = self

    # ---- the declaration, per op
    def check(self, *args):
        raise NotImplementedError

    def limits(self, backend: str, direction: str, inputs) -> list[str]:
        return []

    def order(self, direction: str, inputs) -> Optional[tuple[str, ...]]:
        return None

    def plan(self, inputs, choice: Choice, grad: bool) -> Callable[..., Any]:
        raise NotImplementedError

    def trace(self, inputs, choice: Choice):
        raise NotImplementedError

    # ---- written once
    def backends(self, direction: str) -> tuple[str, ...]:
        return self.forward_backends if direction == "forward" else self.backward_backends

    def directions(self, backend: str) -> tuple[str, str]:
        """(forward, backward) of a custom op's backend argument: "X+Y", or "X" (forward X, backward by the
        reference). The entries pass "X+Y" whenever gradients are recorded (:meth:`Choice.op_arg`)."""
        fwd, _, bwd = backend.partition("+")
        return fwd, bwd or "reference"

    def select(self, inputs, backend: Optional[str], grad: bool) -> Choice:
        """The forward's backend, and the backward's where gradients are recorded (always under compile)."""
        fwd = backends.select(self.name, "forward", inputs, backend)
        if not self.backward_backends or not grad:
            return Choice(fwd)
        return Choice(fwd, backends.select(self.name, "backward", inputs, backend))

    def __call__(self, *args, backend: Optional[str] = None):
        """Run the op on its entry's arguments (positional, in the entry's order)."""
        if torch.compiler.is_compiling():
            inputs = self.check(*args)
            return self.trace(inputs, self.select(inputs, backend, True))
        geometry, requires_grad = _geometry(args, self.values_only)
        grad = requires_grad and torch.is_grad_enabled()
        key = None
        if geometry is not None and not _overrides.active():
            key = (geometry, grad, backend, backends.requested())
            try:
                hit = self.plans.get(key)
            except TypeError:  # an unhashable argument: the checked path says what is wrong with it
                hit = key = None
            if hit is not None:
                backends.report(hit.report)
                return hit.run(*args)
        inputs = self.check(*args)
        choice = self.select(inputs, backend, grad)
        run = self.plan(inputs, choice, grad)
        if key is not None:
            report = {(self.name, "forward"): choice.forward}
            if choice.backward is not None:
                report[(self.name, "backward")] = choice.backward
            self.plans.put(key, Plan(report, run))
        return run(*args)


def autograd(custom_op, setup_context: Callable, backward: Callable) -> type:
    """Register ``backward`` as ``custom_op``'s autograd formula and return the eager training path: an
    ``autograd.Function`` with the same ``setup_context`` and ``backward``, whose ``apply(*op_args,
    forward)`` runs ``forward(*op_args)`` (the op's planned forward) instead of going through the custom
    op's Python dispatch layers, which cost more host time than the kernels take at U-Net sizes.

    ``backward(ctx, *grads)`` returns one gradient per custom-op argument; ``ctx.eager`` is True on the
    eager path, where it may call kernels directly instead of the op's custom ops.
    """
    custom_op.register_autograd(backward, setup_context=setup_context)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *inputs, forward = args
            output = forward(*inputs)
            setup_context(ctx, tuple(inputs), output)
            ctx.eager = True
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            return tuple(backward(ctx, *grads)) + (None,)

    Function.__name__ = Function.__qualname__ = f"{custom_op._name.split('::')[-1]}_function"
    return Function
