"""``vlfast.models``' DDPM blocks with vlfast's fusions (see :mod:`vlfast.blocks`)."""

import torch.nn.functional as F
from torch import Tensor

from ..models import ddpm_unet
from ._common import conv_residual, norm_act, plain_norm, upsample_conv, upsamples_as_one_conv


class ResBlock(ddpm_unet.ResBlock):
    """DDPM's residual block: GroupNorm + SiLU, GroupNorm + time-embedding add + SiLU, the skip added in the
    second convolution's epilogue."""

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        if not (plain_norm(self.norm1) and plain_norm(self.norm2)):
            return super().forward(x, temb)
        h = self.conv1(norm_act(x, self.norm1, "silu"))
        h = self.dropout(norm_act(h, self.norm2, "silu", add=self.temb_proj(F.silu(temb))))
        return conv_residual(h, self.conv2, self.skip(x))


class Upsample(ddpm_unet.Upsample):
    """Nearest 2x then a 3x3 convolution, as one stride-2 transposed convolution."""

    def forward(self, x: Tensor) -> Tensor:
        if not upsamples_as_one_conv(self.conv):
            return super().forward(x)
        return upsample_conv(x, self.conv)


DROP_INS = {ddpm_unet.ResBlock: ResBlock, ddpm_unet.Upsample: Upsample}
