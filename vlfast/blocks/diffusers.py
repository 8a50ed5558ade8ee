"""diffusers' ``ResnetBlock2D`` and ``Upsample2D`` with vlfast's fusions (see :mod:`vlfast.blocks`)."""

import torch
from diffusers.models import resnet, upsampling
from torch import Tensor

from ._common import activation_name, conv_residual, norm_act, plain_norm, upsample_conv, upsamples_as_one_conv


class ResnetBlock2D(resnet.ResnetBlock2D):
    """diffusers' ``ResnetBlock2D``: GroupNorm + activation, the time embedding's add or scale-shift, and
    the shortcut each fused into the kernel beside them."""

    def forward(self, input_tensor: Tensor, temb: Tensor, *args, **kwargs) -> Tensor:
        act = activation_name(self.nonlinearity)
        if (args or kwargs or act is None or not plain_norm(self.norm1) or not plain_norm(self.norm2)
                or (temb is not None and self.time_emb_proj is None)):
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden_states = norm_act(input_tensor, self.norm1, act)
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc, kept
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))  # (N, C or 2C)
            temb = temb.expand(hidden_states.shape[0], -1)  # one embedding for the batch broadcasts, as diffusers
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            scale, shift = torch.chunk(temb, 2, dim=1)
            hidden_states = norm_act(hidden_states, self.norm2, act, scale=scale, shift=shift)
        else:  # "default" adds the embedding; another norm (the VAE's "group") has none
            hidden_states = norm_act(hidden_states, self.norm2, act,
                                     add=temb if self.time_embedding_norm == "default" else None)
        hidden_states = self.dropout(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:  # as diffusers: DDP's gradient-stride warning
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        if self.output_scale_factor == 1:
            return conv_residual(hidden_states, self.conv2, input_tensor)
        return (input_tensor + self.conv2(hidden_states)) / self.output_scale_factor


class Upsample2D(upsampling.Upsample2D):
    """diffusers' ``Upsample2D``: nearest 2x then the 3x3 convolution as one stride-2 transposed convolution
    (four phases of 2x2 taps; the upsampled tensor is never made)."""

    def forward(self, hidden_states: Tensor, output_size=None, *args, **kwargs) -> Tensor:
        conv = None
        if self.use_conv and not self.use_conv_transpose and self.interpolate and not args and not kwargs:
            conv = self.conv if self.name == "conv" else self.Conv2d_0
        doubled = output_size is None or [int(s) for s in output_size] == [2 * s for s in hidden_states.shape[-2:]]
        if conv is None or not doubled or not upsamples_as_one_conv(conv) or hidden_states.shape[1] != self.channels:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return upsample_conv(hidden_states, conv)


DROP_INS = {resnet.ResnetBlock2D: ResnetBlock2D, upsampling.Upsample2D: Upsample2D}
