"""U-Net (Ronneberger, Fischer and Brox, MICCAI 2015) as the common PyTorch port lays it out.

Padded 3x3 convolutions (the output has the input's size, unlike the paper's valid convolutions), each
followed by BatchNorm and ReLU; four max-pool downsamplings and four upsamplings (a 2x2 stride-2
transposed convolution, or bilinear upsampling with ``bilinear=True``), each concatenating the encoder's
feature map of the same level; a final 1x1 convolution to the class scores.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice: (N, in_ch, H, W) -> (N, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        mid_ch = out_ch if mid_ch is None else mid_ch
        super().__init__(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False), nn.BatchNorm2d(mid_ch), nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool then :class:`DoubleConv`: (N, in_ch, H, W) -> (N, out_ch, H // 2, W // 2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))


class Up(nn.Module):
    """Upsample ``x`` by 2, pad it to the skip's size, concatenate [skip, x], :class:`DoubleConv`.

    ``bilinear=False``: ``nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2)``, so the concatenation has
    ``in_ch`` channels when the skip has ``in_ch // 2``. ``bilinear=True``: ``nn.Upsample(scale_factor=2,
    mode="bilinear", align_corners=True)`` keeps the channels (the skip then has as many) and the
    DoubleConv's middle width is ``in_ch // 2``.
    """

    def __init__(self, in_ch: int, out_ch: int, bilinear: bool = False):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_ch, out_ch, in_ch // 2)
        else:
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        # An odd-sized encoder map was floored by the pool: pad the upsampled map back to its size.
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net: (N, n_channels, H, W) -> class scores (N, n_classes, H, W); any H, W >= 16.

    ``base`` is the first level's width (64 in the paper); the levels have base * (1, 2, 4, 8, 16)
    channels (the bottom one halved with ``bilinear=True``, whose upsampling keeps the channels).
    """

    def __init__(self, n_channels: int, n_classes: int, bilinear: bool = False, base: int = 64):
        super().__init__()
        self.n_channels, self.n_classes, self.bilinear = n_channels, n_classes, bilinear
        factor = 2 if bilinear else 1
        b = base
        self.inc = DoubleConv(n_channels, b)
        self.down1 = Down(b, 2 * b)
        self.down2 = Down(2 * b, 4 * b)
        self.down3 = Down(4 * b, 8 * b)
        self.down4 = Down(8 * b, 16 * b // factor)
        self.up1 = Up(16 * b, 8 * b // factor, bilinear)
        self.up2 = Up(8 * b, 4 * b // factor, bilinear)
        self.up3 = Up(4 * b, 2 * b // factor, bilinear)
        self.up4 = Up(2 * b, b, bilinear)
        self.outc = nn.Conv2d(b, n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.down4(x4)
        x = self.up1(x, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
