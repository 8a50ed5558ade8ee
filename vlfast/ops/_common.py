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


def check_tensor(name: str, t, like: Tensor, like_name: str = "input", *, shape=None, same_dtype: bool = True,
                 required: bool = False) -> None:
    """The checks of a tensor argument beside an op's main one (``like``), with errors that name it: a
    floating-point Tensor (None passes unless ``required``), of ``like``'s dtype where ``same_dtype``, on
    ``like``'s device, of ``shape`` where given."""
    if t is None and not required:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor{'' if required else ' or None'}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if same_dtype and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must be the same")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def plain_tensor(t) -> bool:
    """A torch.Tensor or nn.Parameter (not another subclass): one whose metadata alone decides what an op's
    checks and launch plan conclude, so that a plan may be cached for it."""
    return type(t) is Tensor or type(t) is torch.nn.Parameter
