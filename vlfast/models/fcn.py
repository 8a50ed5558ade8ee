"""Fully convolutional networks (Long, Shelhamer and Darrell, CVPR 2015): FCN-32s and FCN-8s.

The backbone is VGG-like: blocks of (3x3 conv, ReLU) closed by a 2x2 max-pool, five of them (stride 32),
then the classifier "convolutionalized": fc6 as a ``fc_kernel`` x ``fc_kernel`` convolution and fc7 as a
1x1 one, each with ReLU and dropout. The defaults are VGG-16's widths; pass smaller ones for tests.

Upsampling is by transposed convolutions with kernel 2s and stride s, initialised by
:func:`bilinear_kernel` as FCN does. Where FCN pads the first convolution by 100 and crops each upsampled
map to its target by fixed offsets, these models pad instead: every layer keeps the size (padded
convolutions, fc6 padded by ``fc_kernel // 2``) and each transposed convolution has padding s / 2, so
for H, W divisible by 32 every map lines up exactly and the output has the input's size, with no crop.
With that padding the bilinear initialisation makes each transposed convolution exactly
``F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)`` away from the border.
"""

import torch
from torch import Tensor, nn

VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)


def bilinear_kernel(in_ch: int, out_ch: int, k: int) -> Tensor:
    """FCN's bilinear upsampling weight for ``nn.ConvTranspose2d(in_ch, out_ch, k, stride=k // 2)``.

    Returns (in_ch, out_ch, k, k) float32: channel c maps to channel c (c < min(in_ch, out_ch)) through
    the separable filter ``f(i) f(j)``, ``f(i) = 1 - |i - center| / factor`` with ``factor = (k + 1) // 2``
    and ``center = factor - 1`` for odd k, ``factor - 0.5`` for even k; every other pair of channels is 0.
    """
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = torch.arange(k, dtype=torch.float64)
    f = 1 - (og - center).abs() / factor
    weight = torch.zeros(in_ch, out_ch, k, k, dtype=torch.float64)
    idx = torch.arange(min(in_ch, out_ch))
    weight[idx, idx] = torch.outer(f, f)
    return weight.float()


def bilinear_upsampler(channels: int, stride: int) -> nn.ConvTranspose2d:
    """``nn.ConvTranspose2d(channels, channels, 2 * stride, stride, padding=stride // 2, bias=False)`` with
    :func:`bilinear_kernel` weights: (N, C, H, W) -> (N, C, stride * H, stride * W). stride even."""
    up = nn.ConvTranspose2d(channels, channels, 2 * stride, stride=stride, padding=stride // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, channels, 2 * stride))
    return up


class VGGBackbone(nn.Module):
    """VGG-like feature extractor; ``forward`` returns (pool3, pool4, fc7): strides 8, 16 and 32.

    (N, in_channels, H, W) -> (N, channels[2], H/8, W/8), (N, channels[3], H/16, W/16),
    (N, fc_channels, H/32, W/32), for H, W divisible by 32.
    """

    def __init__(self, in_channels: int = 3, channels=VGG16_CHANNELS, convs=VGG16_CONVS,
                 fc_channels: int = 4096, fc_kernel: int = 7, dropout: float = 0.5):
        super().__init__()
        if len(channels) != 5 or len(convs) != 5:
            raise ValueError(f"need five blocks (stride 32); got channels={channels}, convs={convs}")
        blocks, prev = [], in_channels
        for width, n in zip(channels, convs):
            layers = []
            for _ in range(n):
                layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU(inplace=True)]
                prev = width
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Sequential(
            nn.Conv2d(prev, fc_channels, fc_kernel, padding=fc_kernel // 2), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        )
        self.out_channels = (channels[2], channels[3], fc_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats[2], feats[3], self.fc(x)


class FCN32s(nn.Module):
    """FCN-32s: 1x1 class scores on fc7, upsampled 32x by one bilinear-initialised transposed convolution
    (kernel 64, stride 32). (N, in_channels, H, W) -> (N, n_classes, H, W), H and W divisible by 32.
    The remaining arguments go to :class:`VGGBackbone`."""

    def __init__(self, n_classes: int, backbone_channels=VGG16_CHANNELS, convs=VGG16_CONVS, in_channels: int = 3,
                 fc_channels: int = 4096, fc_kernel: int = 7, dropout: float = 0.5):
        super().__init__()
        self.backbone = VGGBackbone(in_channels, backbone_channels, convs, fc_channels, fc_kernel, dropout)
        self.score_fr = nn.Conv2d(fc_channels, n_classes, 1)
        self.upscore = bilinear_upsampler(n_classes, 32)

    def forward(self, x: Tensor) -> Tensor:
        _, _, fc7 = self.backbone(x)
        return self.upscore(self.score_fr(fc7))


class FCN8s(nn.Module):
    """FCN-8s: fc7's scores upsampled 2x (kernel 4, stride 2) plus pool4's, upsampled 2x again plus pool3's,
    then upsampled 8x (kernel 16, stride 8); every transposed convolution bilinear-initialised.
    (N, in_channels, H, W) -> (N, n_classes, H, W), H and W divisible by 32. (The paper's all-at-once
    variant also scales pool4 by 0.01 and pool3 by 1e-4; this is the staged one, without.)"""

    def __init__(self, n_classes: int, backbone_channels=VGG16_CHANNELS, convs=VGG16_CONVS, in_channels: int = 3,
                 fc_channels: int = 4096, fc_kernel: int = 7, dropout: float = 0.5):
        super().__init__()
        self.backbone = VGGBackbone(in_channels, backbone_channels, convs, fc_channels, fc_kernel, dropout)
        self.score_fr = nn.Conv2d(fc_channels, n_classes, 1)
        self.score_pool4 = nn.Conv2d(backbone_channels[3], n_classes, 1)
        self.score_pool3 = nn.Conv2d(backbone_channels[2], n_classes, 1)
        self.upscore2 = bilinear_upsampler(n_classes, 2)
        self.upscore_pool4 = bilinear_upsampler(n_classes, 2)
        self.upscore8 = bilinear_upsampler(n_classes, 8)

    def forward(self, x: Tensor) -> Tensor:
        pool3, pool4, fc7 = self.backbone(x)
        h = self.upscore2(self.score_fr(fc7)) + self.score_pool4(pool4)
        h = self.upscore_pool4(h) + self.score_pool3(pool3)
        return self.upscore8(h)
