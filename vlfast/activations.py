"""The activations vlfast fuses into its kernels: the one table of their names and integer codes.

An activation is named ``None`` (identity), ``"silu"``, ``"relu"`` or ``"gelu"`` (the erf form, as
``F.gelu``'s default); the kernels take its code, the name's index in :data:`NAMES`. Everything else
comes from here: ``vlfast.ops._common.ACT_CODE`` / ``ACT_NAME`` (the ops' Python layers), the Triton
constexprs of ``vlfast.kernels.activation`` and ``vlfast.reference``'s ``ACTIVATIONS`` / ``activate``.
The C++ enums (``csrc/cpu/group_norm.h``, ``csrc/cuda/group_norm_kernels.cuh``) and the CUDA glue's
``kActivations`` can't import it: ``tests/test_activations.py`` holds them equal to this table.

Importing this module imports neither Triton nor torch (the reference functions import torch when called).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["NAMES", "CODE", "NAME", "code", "activate", "activation_grad"]

# The code of an activation is its index here. Append new activations at the end (the codes are an ABI of
# the C++ and Triton kernels), then add them to the C++ enums; tests/test_activations.py checks both.
NAMES: tuple = (None, "silu", "relu", "gelu")
CODE: dict = {name: i for i, name in enumerate(NAMES)}  # name -> code
NAME: dict = dict(enumerate(NAMES))  # code -> name


def _invalid(activation) -> ValueError:
    return ValueError(f"activation must be one of {NAMES}, got {activation!r}")


def code(activation) -> int:
    """The kernels' code of an activation name; ValueError for anything not in :data:`NAMES`."""
    # Only None and str can match: keeps unhashable values (a list) and values equal to no name but
    # hashing like one out of the dict lookup.
    if activation is None or isinstance(activation, str):
        c = CODE.get(activation)
        if c is not None:
            return c
    raise _invalid(activation)


def activate(y: Tensor, activation) -> Tensor:
    """activation(y) in plain PyTorch, in y's dtype: the reference of the fused activations."""
    import torch.nn.functional as F

    c = code(activation)
    if c == CODE["silu"]:
        return F.silu(y)
    if c == CODE["relu"]:
        return F.relu(y)
    if c == CODE["gelu"]:
        return F.gelu(y)
    return y


def activation_grad(y: Tensor, activation) -> Tensor:
    """d activation(y) / dy, as PyTorch's backward of each activation computes it, NaN and infinities
    included: ReLU's is 0 where y <= 0 and 1 elsewhere, at NaN too (threshold_backward passes the incoming
    gradient there); SiLU's and GELU's are NaN at NaN and at +-inf (0 * inf in their formulas)."""
    import torch

    c = code(activation)
    if c == CODE["silu"]:
        s = torch.sigmoid(y)
        return s * (1 + y * (1 - s))
    if c == CODE["relu"]:
        return (y <= 0).logical_not().to(y.dtype)
    if c == CODE["gelu"]:
        cdf = 0.5 * (1 + torch.erf(y * 0.7071067811865476))
        return cdf + y * torch.exp(-0.5 * y * y) * 0.3989422804014327
    return torch.ones_like(y)
