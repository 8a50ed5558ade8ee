"""The activations fused into vlfast's Triton kernels, forward and backward, in float32.

Codes (the ``activation`` argument of the ops) come from the one table, vlfast/activations.py: 0 none,
1 SiLU, 2 ReLU, 3 GELU (the erf form, as ``F.gelu``'s default). This package is installed as
``vlfast.kernels``; it is never imported as a top-level ``kernels`` (the relative import below fails there).
"""

import triton
import triton.language as tl

from ..activations import CODE

ACT_NONE = tl.constexpr(CODE[None])
ACT_SILU = tl.constexpr(CODE["silu"])
ACT_RELU = tl.constexpr(CODE["relu"])
ACT_GELU = tl.constexpr(CODE["gelu"])
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
    """g * act'(y), as PyTorch's backward of each activation computes it: ReLU passes g where y is NaN
    (threshold_backward: 0 where y <= 0, else g); SiLU and GELU give NaN at NaN and at +-inf."""
    if ACT == ACT_SILU:
        sig = tl.sigmoid(y)
        g = g * (sig * (1.0 + y * (1.0 - sig)))
    elif ACT == ACT_RELU:
        g = tl.where(y <= 0.0, 0.0, g)
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(y * SQRT1_2))
        g = g * (cdf + y * INV_SQRT_2PI * tl.exp(-0.5 * y * y))
    return g
