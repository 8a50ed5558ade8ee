"""Drop-in modules: subclasses of the torch modules they replace, same constructor, attributes and state_dict."""

from typing import Optional

import torch
from torch import Tensor, nn

from .ops.group_norm import group_norm
from .reference.group_norm import ACTIVATIONS


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with the time-embedding add, scale-shift and activation fused in.

    ``GroupNorm(32, C, activation="silu")(x, add=temb)`` computes
    ``F.silu(F.group_norm(x + temb[:, :, None, None], 32, self.weight, self.bias, self.eps))``
    in one pass over ``x`` (``scale``/``shift``: ``y * (1 + scale) + shift`` before the activation).
    Without the extras it is ``nn.GroupNorm``; its state_dict is interchangeable with one.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, activation: Optional[str] = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: Tensor, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, add=add, scale=scale,
                          shift=shift, activation=self.activation)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + act


def convert(model: nn.Module) -> nn.Module:
    """Swap every ``nn.GroupNorm`` in ``model`` (in place) for a :class:`GroupNorm` sharing its parameters.

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
        else:
            convert(child)
    return model
