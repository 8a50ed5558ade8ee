"""vlfast's fused ops: torch custom ops in the ``vlfast`` namespace, with checked Python entries."""

from .ddpm import fused_step
from .group_norm import group_norm

__all__ = ["fused_step", "group_norm"]
