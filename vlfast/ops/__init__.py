"""vlfast's fused ops: torch custom ops in the ``vlfast`` namespace, with checked Python entries."""

from .ddpm import fused_step

__all__ = ["fused_step"]
