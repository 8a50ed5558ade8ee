"""The activations fused into vlfast's Triton kernels, forward and backward, in float32.

Codes (the ``activation`` argument of the ops): 0 none, 1 SiLU, 2 ReLU, 3 GELU (the erf form, as
``F.gelu``'s default).
"""

import triton
import triton.language as tl

ACT_NONE = tl.constexpr(0)
ACT_SILU = tl.constexpr(1)
ACT_RELU = tl.constexpr(2)
ACT_GELU = tl.constexpr(3)
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def act(y, ACT: tl.constexpr):
    """act(y); NaN stays NaN (ReLU by where, not tl.maximum, which drops NaN)."""
    if ACT == ACT_SILU:
        y = y * tl.sigmoid(y)
    elif ACT == ACT_RELU:
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == ACT_GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * SQRT1_2))
    return y


@triton.jit
def act_backward(g, y, ACT: tl.constexpr):
    """g * act'(y), as PyTorch's backward of each activation computes it."""
    if ACT == ACT_SILU:
        sig = tl.sigmoid(y)
        g = g * (sig * (1.0 + y * (1.0 - sig)))
    elif ACT == ACT_RELU:
        g = tl.where(y <= 0.0, 0.0, g)
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(y * SQRT1_2))
        g = g * (cdf + y * INV_SQRT_2PI * tl.exp(-0.5 * y * y))
    return g
