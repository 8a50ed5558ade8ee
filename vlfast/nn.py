"""Drop-in modules: subclasses of the torch modules they replace, same constructor, attributes and state_dict."""

import inspect
import warnings
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import activate, code
from .ops.conv2d import conv2d
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


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with the bias, a residual add, an activation and the output write fused into one
    kernel; vlfast's Triton kernel targets dilated convolutions.

    Same constructor (every argument of the installed torch's class), attributes and state_dict as
    ``nn.Conv2d``, plus ``activation`` (None, "relu", "silu" or "gelu"):
    ``Conv2d(64, 64, 3, padding=2, dilation=2, activation="relu")(x, residual=h)`` is
    ``F.relu(nn.Conv2d(64, 64, 3, padding=2, dilation=2)(x) + h)``. ``forward(input, residual=None,
    out=None)``: ``residual`` (the output's shape) is added before the activation; ``out`` (e.g. a
    channel slice of a concat buffer) receives the result in place. Every ``padding_mode``: the
    non-"zeros" ones pad with ``F.pad`` first, as ``nn.Conv2d`` does.
    """

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        code(activation)  # ValueError for an unknown one
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                      activation=self.activation, residual=residual, out=out)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act


GroupNorm.__init__.__signature__ = _with_activation(nn.GroupNorm)
ConvTranspose2d.__init__.__signature__ = _with_activation(nn.ConvTranspose2d)
Conv2d.__init__.__signature__ = _with_activation(nn.Conv2d)

# torch's class -> vlfast's drop-in, for convert(). nn.Conv2d is not among them: which convolutions
# convert() switches is its ``conv2d`` option (CONV2D_MODES).
DROP_INS = {nn.GroupNorm: GroupNorm, nn.ConvTranspose2d: ConvTranspose2d}
CONV2D_MODES = ("dilated", "all", "none")
# The activation modules convert() fuses into a preceding Conv2d inside an nn.Sequential (exact classes).
_FUSIBLE = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}


def convert(model: nn.Module, *, conv2d: str = "dilated", blocks: bool = True) -> nn.Module:
    """Make every ``nn.GroupNorm`` and ``nn.ConvTranspose2d`` in ``model`` (``model`` itself included) run
    vlfast's :class:`GroupNorm` / :class:`ConvTranspose2d`, and the ``nn.Conv2d`` that ``conv2d`` selects
    vlfast's :class:`Conv2d`, in place; returns ``model``.

    ``conv2d``: "dilated" (the default: those whose dilation is not (1, 1), the convolutions vlfast's
    kernel targets), "all" (every ``nn.Conv2d``) or "none". Then, unless "none", inside each
    ``nn.Sequential`` (or a subclass with its forward), a vlfast :class:`Conv2d` without an activation
    that is immediately followed by an ``nn.ReLU``, ``nn.SiLU`` or ``nn.GELU(approximate="none")`` (exact
    classes) takes that activation (``conv.activation``) and the activation's slot becomes
    ``nn.Identity()``: one kernel instead of two. Only where the convolution is used once in ``model``
    and neither module has forward or backward hooks (a hook would see another tensor).

    ``blocks``: also switch the model blocks vlfast has fused versions of (diffusers' ``ResnetBlock2D`` and
    ``Upsample2D``, ``vlfast.models``' DDPM ``ResBlock``, ``Upsample`` and U-Net ``DoubleConv``, and each
    ``nn.Sequential`` holding a Conv2d -> BatchNorm2d pair; see :mod:`vlfast.blocks`), whose forward then
    runs GroupNorm with the time-embedding add or scale-shift and the activation in one kernel, the shortcut
    in the second convolution's epilogue, nearest 2x + 3x3 convolution as one transposed convolution, and
    (eval mode) convolution + BatchNorm + activation as one convolution; each falls back to the block's own
    forward where a part is not the plain layer it expects.

    Each module object stays what it is, where it is: its class is switched to vlfast's subclass, so
    parameters, buffers, hooks (forward, pre-forward, backward, state_dict; the legacy ``weight_norm`` and
    ``spectral_norm`` ones included), parametrizations, custom attributes and a module used in several
    places are all kept, and ``isinstance(m, nn.GroupNorm)`` still holds. torch's classes are never
    patched. Subclasses of those torch classes (user code whose ``forward`` vlfast cannot know) are left
    as they are, with a warning. Equivalent for one module: ``m.__class__ = vlfast.nn.GroupNorm;
    m.activation = None``.
    """
    if conv2d not in CONV2D_MODES:
        raise ValueError(f"conv2d must be one of {CONV2D_MODES}, got {conv2d!r}")
    from . import blocks as fused_blocks  # (imports this module)
    block_drop_ins = fused_blocks.drop_ins() if blocks else {}
    for module in model.modules():  # each object once, however often it is used
        fused = fused_blocks.fused_class(module, block_drop_ins) if blocks else None
        _convert_one(module, {**_drop_ins(module, conv2d), **({type(module): fused} if fused else block_drop_ins)})
    if conv2d != "none":
        _fuse_activations(model)
    return model


def _drop_ins(module: nn.Module, conv2d: str) -> dict:
    """The classes to switch for this module: DROP_INS, and nn.Conv2d where the ``conv2d`` mode selects it."""
    if conv2d == "all" or (conv2d == "dilated" and isinstance(module, nn.Conv2d)
                           and tuple(module.dilation) != (1, 1)):
        return {**DROP_INS, nn.Conv2d: Conv2d}
    return DROP_INS


def _convert_one(module: nn.Module, drop_ins: dict) -> None:
    cls = type(module)
    if cls in drop_ins:
        module.__class__ = drop_ins[cls]
    elif parametrize.is_parametrized(module) and cls.__bases__[0] in drop_ins:
        # torch.nn.utils.parametrize gave this module a class of its own, ParametrizedX(X), that holds the
        # parametrized properties; the same class over vlfast's X keeps them (remove_parametrizations
        # then restores vlfast's X).
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, (drop_ins[cls.__bases__[0]],), body)
    else:
        parents = [base for base in drop_ins if isinstance(module, base) and not isinstance(module, drop_ins[base])]
        if parents:
            warnings.warn(f"vlfast.nn.convert: left {cls.__qualname__} (a subclass of {parents[0].__name__}) as "
                          "it is: its forward is its own", stacklevel=3)
        return
    if isinstance(module, (GroupNorm, ConvTranspose2d, Conv2d)):
        module.activation = None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fuse_activations(model: nn.Module) -> None:
    """The Sequential fusion of :func:`convert`."""
    from .blocks import models, sequential
    forwards = (nn.Sequential.forward, sequential.Sequential.forward, models.DoubleConv.forward)
    uses: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):  # a shared subtree counts once per use
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward not in forwards:
            continue
        items = list(seq._modules.items())
        for (_, conv), (name, act) in zip(items, items[1:]):
            if not (isinstance(conv, Conv2d) and type(conv).forward is Conv2d.forward and conv.activation is None
                    and type(act) in _FUSIBLE and getattr(act, "approximate", "none") == "none"
                    and uses[id(conv)] == 1 and not _hooked(conv) and not _hooked(act)):
                continue
            conv.activation = _FUSIBLE[type(act)]
            seq._modules[name] = nn.Identity().train(act.training)
