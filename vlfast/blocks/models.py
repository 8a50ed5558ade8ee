"""``vlfast.models``' DDPM blocks with vlfast's fusions (see :mod:`vlfast.blocks`)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as vnn
from ..models import ddpm_unet, unet
from ..ops._common import suggest_memory_format
from ..ops.conv_transpose import conv_transpose2d
from ._common import _hooked, conv_residual, norm_act, plain_norm, upsample_conv, upsamples_as_one_conv
from .sequential import sequential_forward


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


class DoubleConv(unet.DoubleConv):
    """The U-Net's (3x3 conv, BatchNorm, ReLU) x 2: in eval mode two convolutions, BatchNorm folded in and
    ReLU in the epilogue."""

    def forward(self, input: Tensor) -> Tensor:
        return sequential_forward(self, input)


class Up(unet.Up):
    """The U-Net's up step: the 2x2 transposed convolution writes into its half of the concatenation buffer
    (no separate ``torch.cat`` of its output) where no padding is needed."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up
        h, w = 2 * x.shape[-2], 2 * x.shape[-1]
        if (type(up) not in (nn.ConvTranspose2d, vnn.ConvTranspose2d) or getattr(up, "activation", None) is not None
                or _hooked(up) or up.padding_mode != "zeros" or tuple(up.stride) != (2, 2)
                or tuple(up.kernel_size) != (2, 2) or tuple(up.padding) != (0, 0)
                or tuple(up.output_padding) != (0, 0) or tuple(skip.shape[-2:]) != (h, w) or skip.dim() != 4
                or skip.dtype != x.dtype or skip.shape[0] != x.shape[0]
                or torch.is_autocast_enabled(x.device.type)):  # (the convolution's dtype is autocast's)
            return super().forward(x, skip)
        c = skip.shape[1]
        nhwc = suggest_memory_format(skip) == suggest_memory_format(x) == torch.channels_last  # torch.cat's rule
        buf = torch.empty((x.shape[0], c + up.out_channels, h, w), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        buf[:, :c].copy_(skip)
        conv_transpose2d(x, up.weight, up.bias, up.stride, up.padding, up.output_padding, up.groups, up.dilation,
                         out=buf[:, c:])
        return self.conv(buf)


DROP_INS = {ddpm_unet.ResBlock: ResBlock, ddpm_unet.Upsample: Upsample, unet.DoubleConv: DoubleConv, unet.Up: Up}
