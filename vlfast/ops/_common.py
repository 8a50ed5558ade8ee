"""What the ops' Python layers share: the output memory format and the integer arithmetic of launch grids."""

import functools

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) for a tensor in that layout (and not also contiguous), else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


# Plain Python: triton.next_power_of_2 and triton.cdiv go through Triton's constexpr-function wrapper,
# several µs a call on a launcher's hot path.
def pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a GPU; 132 (an H100) for CPU tensors, which Triton runs under its interpreter."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def plain_tensor(t) -> bool:
    """A torch.Tensor or nn.Parameter (not another subclass): one whose metadata alone decides what an op's
    checks and launch plan conclude, so that a plan may be cached for it."""
    return type(t) is Tensor or type(t) is torch.nn.Parameter
