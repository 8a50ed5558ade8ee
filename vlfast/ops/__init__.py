"""vlfast's fused ops: torch custom ops in the ``vlfast`` namespace, with checked Python entries."""

from .conv2d import conv2d
from .conv_transpose import conv_transpose2d
from .ddpm import fused_step
from .group_norm import group_norm

__all__ = ["conv2d", "conv_transpose2d", "fused_step", "group_norm"]
