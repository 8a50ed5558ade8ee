"""vlfast's fused ops: torch custom ops in the ``vlfast`` namespace, with checked Python entries."""

from .conv_transpose import conv_transpose2d
from .ddpm import fused_step
from .group_norm import group_norm

__all__ = ["conv_transpose2d", "fused_step", "group_norm"]
