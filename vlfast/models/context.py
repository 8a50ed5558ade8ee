"""Dilated-convolution heads: Yu and Koltun's context module (ICLR 2016) and DeepLab's ASPP."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ContextModule(nn.Sequential):
    """Yu and Koltun's basic context module: (N, C, H, W) -> (N, C, H, W).

    One 3x3 convolution per entry of ``dilations`` (padding = dilation, so the size is kept), each followed
    by ReLU, then a 1x1 convolution without one (the paper's final layer). ``identity_init=True`` gives
    the paper's identity initialisation (each 3x3 passes channel c through its centre tap, biases 0): the
    module is then the identity on non-negative inputs. Default: PyTorch's random initialisation.
    Equivalent code: ``for d in dilations: x = relu(conv3x3(x, dilation=d, padding=d))``; ``conv1x1(x)``.
    """

    def __init__(self, channels: int, dilations=(1, 1, 2, 4, 8, 16, 1), identity_init: bool = False):
        layers = []
        for d in dilations:
            layers += [nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, channels, 1))
        super().__init__(*layers)
        if identity_init:
            with torch.no_grad():
                for m in self:
                    if isinstance(m, nn.Conv2d):
                        m.weight.zero_()
                        m.bias.zero_()
                        c = torch.arange(channels)
                        k = m.kernel_size[0] // 2
                        m.weight[c, c, k, k] = 1.0


def _conv_bn_relu(in_ch: int, out_ch: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv + BatchNorm + ReLU, bilinear back to (H, W)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab v3's atrous spatial pyramid pooling: (N, in_channels, H, W) -> (N, out_channels, H, W).

    Branches, each conv (bias-free) + BatchNorm + ReLU with ``out_channels`` outputs: a 1x1 conv, one 3x3
    conv per entry of ``rates`` (dilation = padding = rate) and, with ``image_pooling``, the image-level
    branch (:class:`ImagePooling`). They are concatenated and projected by 1x1 conv + BatchNorm + ReLU,
    then dropout. (The image-pooling branch's BatchNorm needs a batch above 1 in training mode.)
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates=(6, 12, 18), image_pooling: bool = True,
                 dropout: float = 0.5):
        super().__init__()
        branches = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, r) for r in rates]
        if image_pooling:
            branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * out_channels, out_channels, 1),
                                     nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))
