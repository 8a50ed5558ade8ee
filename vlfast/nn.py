"""Drop-in modules: subclasses of the torch modules they replace, same constructor, attributes and state_dict."""

import inspect
import warnings
from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import activate, code
from .ops.conv_transpose import conv_transpose2d
from .ops.group_norm import group_norm


def _with_activation(parent: type):
    """The signature of ``parent.__init__`` (the installed torch's) plus the keyword ``activation=None``."""
    sig = inspect.signature(parent.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("activation", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Optional[str]))
    return sig.replace(parameters=params)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with the time-embedding add, scale-shift and activation fused in.

    ``GroupNorm(32, C, activation="silu")(x, add=temb)`` computes
    ``F.silu(F.group_norm(x + temb[:, :, None, None], 32, self.weight, self.bias, self.eps))``
    in one pass over ``x`` (``scale``/``shift``: ``y * (1 + scale) + shift`` before the activation).
    The constructor takes every argument of the installed torch's ``nn.GroupNorm`` (e.g. ``bias=`` in
    torch 2.13), plus ``activation``. Without the extras it is ``nn.GroupNorm``; its state_dict is
    interchangeable with one.
    """

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        code(activation)  # ValueError for an unknown one
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, input: Tensor, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, add=add, scale=scale,
                          shift=shift, activation=self.activation)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act


class ConvTranspose2d(nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` with the bias, an activation and the output write fused into one kernel.

    Same constructor (every argument of the installed torch's class), attributes and state_dict as
    ``nn.ConvTranspose2d``, plus ``activation`` (None, "relu", "silu" or "gelu"):
    ``ConvTranspose2d(1024, 512, 2, stride=2, activation="relu")(x)`` is
    ``F.relu(nn.ConvTranspose2d(1024, 512, 2, stride=2)(x))``. ``forward(input, output_size=None,
    *, out=None)``: ``out`` (e.g. a channel slice of a concat buffer) receives the result in place.
    """

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        code(activation)  # ValueError for an unknown one
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None, *,
                out: Optional[Tensor] = None) -> Tensor:
        if self.padding_mode != "zeros":  # not fused: the parent's path (which rejects it today)
            y = activate(super().forward(input, output_size), self.activation)
            return y if out is None else out.copy_(y)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                self.groups, self.dilation, activation=self.activation, out=out)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act


GroupNorm.__init__.__signature__ = _with_activation(nn.GroupNorm)
ConvTranspose2d.__init__.__signature__ = _with_activation(nn.ConvTranspose2d)

# torch's class -> vlfast's drop-in, for convert().
DROP_INS = {nn.GroupNorm: GroupNorm, nn.ConvTranspose2d: ConvTranspose2d}


def convert(model: nn.Module) -> nn.Module:
    """Make every ``nn.GroupNorm`` and ``nn.ConvTranspose2d`` in ``model`` (``model`` itself included) run
    vlfast's :class:`GroupNorm` / :class:`ConvTranspose2d`, in place; returns ``model``.

    Each module object stays what it is, where it is: its class is switched to vlfast's subclass, so
    parameters, buffers, hooks (forward, pre-forward, backward, state_dict; the legacy ``weight_norm`` and
    ``spectral_norm`` ones included), parametrizations, custom attributes and a module used in several
    places are all kept, and ``isinstance(m, nn.GroupNorm)`` still holds. torch's classes are never
    patched. Subclasses of those torch classes (user code whose ``forward`` vlfast cannot know) are left
    as they are, with a warning. Equivalent for one module: ``m.__class__ = vlfast.nn.GroupNorm;
    m.activation = None``.
    """
    for module in model.modules():  # each object once, however often it is used
        _convert_one(module)
    return model


def _convert_one(module: nn.Module) -> None:
    cls = type(module)
    if cls in DROP_INS:
        module.__class__ = DROP_INS[cls]
    elif parametrize.is_parametrized(module) and cls.__bases__[0] in DROP_INS:
        # torch.nn.utils.parametrize gave this module a class of its own, ParametrizedX(X), that holds the
        # parametrized properties; the same class over vlfast's X keeps them (remove_parametrizations
        # then restores vlfast's X).
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, (DROP_INS[cls.__bases__[0]],), body)
    else:
        parents = [base for base in DROP_INS if isinstance(module, base) and not isinstance(module, DROP_INS[base])]
        if parents:
            warnings.warn(f"vlfast.nn.convert: left {cls.__qualname__} (a subclass of {parents[0].__name__}) as "
                          "it is: its forward is its own", stacklevel=3)
        return
    module.activation = None
