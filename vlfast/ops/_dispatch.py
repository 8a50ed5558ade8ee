"""The machinery every op shares, written once: the op declaration, the eager fast path, the plan cache,
the backend choice of both directions and the training path.

An op is a subclass of :class:`Op` declaring

- ``name``, ``forward_backends`` / ``backward_backends`` (the backends with a kernel for each direction;
  ``backward_backends = ()`` for an op without gradients) and ``extension_ops`` (the ``vlfast._C`` ops
  its cuda/cpp backends call, per direction, or per backend within a direction where they differ);
- ``check(*args) -> inputs``: the argument checks (errors name the argument) and what the kernels need
  to know of the call (an object with at least ``device`` and ``dtype``);
- ``limits(backend, direction, inputs) -> [reason]``: every input-dependent limit of its kernels (index
  widths, grid sizes, unsupported geometries), which :func:`vlfast.backends.not_supported_reasons` adds
  to the device's and the build's;
- ``tuning_fields(inputs)``: the coarse classes of a call (layout, kernel, channels, size) that key the
  per-card tables of measured orders (:mod:`vlfast.tuning`);
- ``rule(direction, inputs)``: auto's fastest-first order for these inputs on a card without a table (or
  a call no table entry speaks for), where it differs from the device's default (None otherwise);
- ``plan(inputs, choice, grad) -> run``: the eager call, with everything worked out from the metadata
  done once (``run`` takes the entry's arguments and only allocates and launches);
- ``trace(inputs, choice)``: the call under ``torch.compile``, through the op's torch custom ops;
- ``autocast_policy`` / ``autocast_args``: what PyTorch's autocast does to the aten op it fuses;
- ``reference(*args)``: the entry's semantics in plain PyTorch (for ``torch.func`` transforms);
- ``eager_is_reference``: whether that reference is the PyTorch composition users run eagerly (the DDPM
  step's is not: Philox in plain PyTorch), so that a benchmark's eager time stands for it.

:meth:`Op.__call__` then does the rest the same way for every op: under autocast it casts the
arguments as PyTorch would; under ``torch.compile`` and ``torch.jit.trace`` it calls the op's custom
ops; under ``torch.func`` transforms and forward-mode AD it runs :meth:`Op.reference`. Otherwise, at a
geometry seen before (shapes, strides, dtypes, devices and the non-tensor arguments; whether gradients
are recorded; the backend request; the private knobs set), eager calls skip the checks and the planning
and run the cached plan; at a new one it checks, selects the forward's backend and, where gradients are
recorded, the backward's (:func:`vlfast.backends.select`), plans (under the knobs the card's tuning table
gives that backend at the call's key, :func:`vlfast.tuning.knobs`) and caches. :func:`autograd` makes the eager
training path and the custom op's ``register_autograd`` from one ``setup_context`` and one ``backward``,
with gradients of any order (the reference's where the backward itself is recorded).
"""

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from .. import backends, tuning
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
    report: dict            # {(op, direction): backend, (op, "key"): tuning key, (op, "knobs"): plan knobs}
    run: Callable[..., Any]  # run(*entry arguments) -> the entry's result


class Op:
    """An op's declaration (see the module docstring); one instance per op, called by its Python entry."""

    name: str = ""
    forward_backends: tuple[str, ...] = backends.BACKENDS
    backward_backends: tuple[str, ...] = ()
    extension_ops: dict = {}
    values_only: frozenset = frozenset()  # entry argument positions that never change the plan
    # PyTorch's autocast policy for the aten op this op fuses, per device type ("lower": the autocast
    # dtype, "fp32": float32; absent: untouched), and the entry's tensor positions it applies to.
    autocast_policy: dict = {}
    autocast_args: tuple = ()
    # Whether the reference backend runs the same aten calls as the benchmarks' eager provider (its times
    # then stand for the reference's in the tuning tables, vlfast.tuning.build).
    eager_is_reference: bool = False

    def __init__(self):
        self.plans = PlanCache()
        backends.OPS[self.name] = self

    # ---- the declaration, per op
    def check(self, *args):
        raise NotImplementedError

    def limits(self, backend: str, direction: str, inputs) -> list[str]:
        return []

    def tuning_fields(self, inputs) -> tuple[str, ...]:
        return ()

    def rule(self, direction: str, inputs) -> Optional[tuple[str, ...]]:
        return None

    def plan(self, inputs, choice: Choice, grad: bool) -> Callable[..., Any]:
        raise NotImplementedError

    def trace(self, inputs, choice: Choice):
        raise NotImplementedError

    # ---- written once
    def order(self, direction: str, inputs) -> Optional[tuple[str, ...]]:
        """auto's fastest-first order for one call: the device's tuning table where it has an entry for the
        call's key (or a prefix of it), followed by the backends it did not measure in the order of
        :meth:`rule` (or the device's priority); else :meth:`rule`."""
        rule = self.rule(direction, inputs)
        measured = tuning.lookup(self.name, direction, tuning.key(self.name, inputs), inputs.device)
        if measured is None:
            return rule
        rest = rule or backends.PRIORITY.get(inputs.device.type, ())
        return measured + tuple(b for b in rest if b not in measured)

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
            inputs = self.check(*self.autocast(args))
            return self.trace(inputs, self.select(inputs, backend, True))
        if torch._C._is_any_autocast_enabled():
            args = self.autocast(args)
        if torch.jit.is_tracing():  # the trace records the custom ops (aten-level: it can be saved)
            inputs = self.check(*args)
            return self.trace(inputs, self.select(inputs, backend, True))
        if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
            return self.transformed(args, backend)
        geometry, requires_grad = _geometry(args, self.values_only)
        grad = requires_grad and torch.is_grad_enabled()
        key = None
        if geometry is not None:
            key = (geometry, grad, backend, backends.requested(), _overrides.snapshot())
            try:
                hit = self.plans.get(key)
            except TypeError:  # an unhashable argument: the checked path says what is wrong with it
                hit = key = None
            if hit is not None:
                backends.report(hit.report)
                return hit.run(*args)
        inputs = self.check(*args)
        choice = self.select(inputs, backend, grad)
        call_key = tuning.key(self.name, inputs)
        # The knobs the card's table gives the forward's backend at this key (the caller's own go first).
        knobs = {k: v for k, v in tuning.knobs(self.name, "forward", call_key, inputs.device, choice.forward).items()
                 if _overrides.get(k) is None}
        with _overrides.use(**knobs) if knobs else contextlib.nullcontext():
            run = self.plan(inputs, choice, grad)
            planned = _overrides.plan_knobs()
        report = {(self.name, "forward"): choice.forward, (self.name, "key"): call_key}
        if planned:
            report[(self.name, "knobs")] = planned
        if choice.backward is not None:
            report[(self.name, "backward")] = choice.backward
        backends.report(report)
        if key is not None:
            self.plans.put(key, Plan(report, run))
        return run(*args)

    def autocast(self, args: tuple) -> tuple:
        """The arguments as PyTorch's autocast would hand them to the aten op this op fuses: under an
        enabled autocast of the input's device type, the floating tensors at :attr:`autocast_args` (not
        float64) cast to the autocast dtype ("lower" policy) or to float32 ("fp32"); unchanged where
        :attr:`autocast_policy` names no policy for that device type (the aten op is not in its lists)."""
        x = args[0]
        if not isinstance(x, Tensor):
            return args
        device_type = x.device.type
        policy = self.autocast_policy.get(device_type)
        if policy is None or not torch.is_autocast_enabled(device_type):
            return args
        dtype = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
        args = list(args)
        for i in self.autocast_args:
            a = args[i]
            if isinstance(a, Tensor) and a.is_floating_point() and a.dtype not in (dtype, torch.float64):
                args[i] = a.to(dtype)
        return tuple(args)

    def transformed(self, args: tuple, backend: Optional[str]):
        """Under ``torch.func`` transforms (grad, vmap, jacrev, jvp...) and forward-mode AD: the op's
        :meth:`reference`, plain PyTorch that those transforms differentiate and batch like any PyTorch code
        (no kernel sees a wrapped tensor). A forced backend other than the reference is refused."""
        request = backend if backend is not None else backends.requested()
        if request.partition("+")[0] not in ("auto", "reference"):
            raise RuntimeError(f"vlfast: backend {request!r} cannot run {self.name} under torch.func transforms "
                               "or forward-mode AD; only the reference (plain PyTorch) can")
        backends.report({(self.name, "forward"): "reference"})
        return self.reference(*args)

    def reference(self, *args):
        """The entry's semantics in plain PyTorch, for :meth:`transformed`: by default the reference
        backend's plan (ops whose checks query layouts, which ``vmap`` cannot answer, call their
        reference module directly instead)."""
        return self.plan(self.check(*args), Choice("reference"), False)(*args)


def autograd(custom_op, setup_context: Callable, backward: Callable, reference: Callable) -> type:
    """Register the op's autograd formula on ``custom_op`` and return the eager training path: an
    ``autograd.Function`` with the same ``setup_context`` and ``backward``, whose ``apply(*op_args,
    forward)`` runs ``forward(*op_args)`` (the op's planned forward) instead of going through the custom
    op's Python dispatch layers, which cost more host time than the kernels take at U-Net sizes.

    ``setup_context(ctx, inputs, output)`` saves the custom op's tensor arguments first, in order
    (None where absent), then anything else its backward needs; ``backward(ctx, *grads)`` returns one
    gradient per custom-op argument; ``ctx.eager`` is True on the eager path, where it may call kernels
    directly instead of the op's custom ops. ``reference(*op_args[:-1])`` (every argument but the
    backend) gives the custom op's outputs in plain PyTorch: where autograd records the backward itself
    (double backward: ``create_graph=True``), the gradients are those of the reference, differentiable
    to any order.
    """
    schema = custom_op._opoverload._schema
    tensor_args = tuple(i for i, a in enumerate(schema.arguments) if str(a.type) in ("Tensor", "Optional[Tensor]"))

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.op_args = tuple(None if i in tensor_args else a for i, a in enumerate(inputs))

    def backward_any_order(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph: gradients autograd can differentiate again
            return _reference_backward(ctx, grads, tensor_args, reference)
        return backward(ctx, *grads)

    custom_op.register_autograd(backward_any_order, setup_context=setup)

    # Forward with ctx, not a setup_context staticmethod: apply then skips binding the arguments to a
    # signature (inspect, ~40 us a call). torch.func never reaches it (Op.transformed).
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *inputs, forward = args
            output = forward(*inputs)
            setup(ctx, tuple(inputs), output)
            ctx.eager = True
            return output

        @staticmethod
        def backward(ctx, *grads):
            return tuple(backward_any_order(ctx, *grads)) + (None,)

    Function.__name__ = Function.__qualname__ = f"{custom_op._name.split('::')[-1]}_function"
    return Function


def _reference_backward(ctx, grads: tuple, tensor_args: tuple, reference: Callable) -> list:
    """The gradients of the op's custom-op arguments by autograd through ``reference``, recomputed from the
    saved inputs with ``create_graph=True`` (the second-order path: gradient penalties, Hessian products)."""
    args = list(ctx.op_args)
    for i, t in zip(tensor_args, ctx.saved_tensors):
        args[i] = t
    with torch.enable_grad():
        outputs = reference(*args[:-1])
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    wrt = [i for i in tensor_args if ctx.needs_input_grad[i] and args[i] is not None]
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    result = [None] * len(args)
    if wrt and pairs:
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wrt], [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
        for i, g in zip(wrt, got):
            result[i] = g if g is not None else torch.zeros_like(args[i])
    return result
