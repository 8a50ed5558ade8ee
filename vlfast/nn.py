"""Drop-in modules: subclasses of the torch modules they replace, same constructor, attributes and state_dict."""

from typing import Optional

from torch import Tensor, nn

from .activations import activate, code
from .ops.conv_transpose import conv_transpose2d
from .ops.group_norm import group_norm


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with the time-embedding add, scale-shift and activation fused in.

    ``GroupNorm(32, C, activation="silu")(x, add=temb)`` computes
    ``F.silu(F.group_norm(x + temb[:, :, None, None], 32, self.weight, self.bias, self.eps))``
    in one pass over ``x`` (``scale``/``shift``: ``y * (1 + scale) + shift`` before the activation).
    Without the extras it is ``nn.GroupNorm``; its state_dict is interchangeable with one.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, activation: Optional[str] = None):
        code(activation)  # ValueError for an unknown one
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
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

    Same constructor, attributes and state_dict as ``nn.ConvTranspose2d``, plus ``activation``
    (None, "relu", "silu" or "gelu"): ``ConvTranspose2d(1024, 512, 2, stride=2, activation="relu")(x)``
    is ``F.relu(nn.ConvTranspose2d(1024, 512, 2, stride=2)(x))``. ``forward(input, output_size=None,
    *, out=None)``: ``out`` (e.g. a channel slice of a concat buffer) receives the result in place.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None, *, activation: Optional[str] = None):
        code(activation)  # ValueError for an unknown one
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device=device, dtype=dtype)
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


def convert(model: nn.Module) -> nn.Module:
    """Swap every ``nn.GroupNorm`` and ``nn.ConvTranspose2d`` in ``model`` (in place) for vlfast's
    :class:`GroupNorm` / :class:`ConvTranspose2d` sharing its parameters.

    Module instances are replaced, never classes or aten ops; returns ``model``.
    """
    for name, child in list(model.named_children()):
        if type(child) is nn.GroupNorm:
            new = GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine,
                            device=child.weight.device if child.affine else None,
                            dtype=child.weight.dtype if child.affine else None)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(model, name, new)
        elif type(child) is nn.ConvTranspose2d:
            new = ConvTranspose2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, child.output_padding, child.groups, child.bias is not None,
                                  child.dilation, child.padding_mode, device="meta", dtype=child.weight.dtype)
            new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert(child)
    return model
