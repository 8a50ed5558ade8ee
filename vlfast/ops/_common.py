"""What the ops' Python layers share: the output memory format and the integer arithmetic of launch grids."""

import functools
from typing import Optional

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) for a tensor in that layout (and not also contiguous), else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def layout_class(x: Tensor) -> str:
    """A tuning key's layout field (vlfast.tuning): "channels_last" where :func:`memory_format` says a
    channels-last layout (2-D or 3-D), else "nchw"."""
    return "nchw" if memory_format(x) == torch.contiguous_format else "channels_last"


def pair(v, name: str, low: int) -> list[int]:
    """int or a sequence of 1 or 2 ints -> [a, b], each >= low (a convolution's stride, padding, ...)."""
    if isinstance(v, (list, tuple, torch.Size)) and len(v) in (1, 2):
        vals = list(v) * (2 // len(v))
    else:
        vals = [v, v]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
        raise TypeError(f"{name} must be an int or a tuple of 2 ints, got {v!r}")
    if any(x < low for x in vals):
        what = "positive" if low == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return vals


def check_conv_operands(input, weight: Tensor, groups, op: str, weight_dims: str) -> None:
    """The checks both convolutions make of input, weight and groups, as PyTorch's refuse them: a
    floating-point 3-D or 4-D input with pixels (unless the batch is empty), a 4-D weight of the input's
    dtype and device with no zero dimension, a positive int groups. ``weight_dims`` names the weight's
    dimensions for the error message."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (Cin, H, W) or 4-D (N, Cin, H, W), got shape {tuple(input.shape)}")
    check_tensor("weight", weight, input, required=True)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D ({weight_dims}), got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if 0 in weight.shape:  # F.conv2d and F.conv_transpose2d refuse these too (torch 2.13, every dtype and layout)
        raise ValueError(f"weight must have no dimension of size 0 ({weight_dims}), got shape "
                         f"{tuple(weight.shape)}")
    if 0 in input.shape[-2:] and (input.dim() == 3 or input.shape[0] > 0):  # as F.{op}
        raise ValueError(f"input of shape {tuple(input.shape)} has no pixels: only an empty batch is supported "
                         f"(as F.{op})")


def check_out(out: Optional[Tensor], input: Tensor, shape: list, unbatched: bool) -> Optional[Tensor]:
    """``out`` checked against the output's (batched) ``shape``, batched: None where not given. PyTorch's out=
    ops refuse a stride-0 dim of size > 1 (what torch._debug_has_internal_overlap(out) calls 1, written out
    so that torch.compile traces it), with these words."""
    if out is None:
        return None
    check_tensor("out", out, input, shape=shape[1:] if unbatched else shape)
    if any(st == 0 and size > 1 for size, st in zip(out.shape, out.stride())):
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                           "single memory location. Please clone() the tensor before performing the operation.")
    return out.unsqueeze(0) if unbatched else out


def span(t: Optional[Tensor]) -> int:
    """Bytes from t's first element to just past its last (0 for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def shares_memory(out: Tensor, t: Optional[Tensor]) -> bool:
    """Whether the memory spans of ``out`` and ``t`` meet (interleaved views, such as two channel slices of one
    NCHW buffer, count as meeting): where they do, a kernel writing ``out`` could change what it reads of ``t``."""
    a, b = span(out), span(t)
    if not a or not b:
        return False
    lo, other = out.data_ptr(), t.data_ptr()
    return other < lo + a and lo < other + b


def overlap_safe(run, out: Tensor, reads: tuple, in_place: Optional[int] = None):
    """``run(out, *reads)`` (a kernel plan writing ``out``) made right for an ``out`` that may share memory with
    what the kernels read: such a call computes into a fresh tensor of out's strides and copies, giving what
    ``out.copy_(result)`` gives. The memory spans decide (worked out here once per geometry, so that a call
    costs a few data_ptr reads); interleaved views, such as two channel slices of one NCHW buffer, count as
    meeting. ``in_place``: the index in ``reads`` of a tensor that may be ``out`` itself (same first element,
    same strides), which the kernels read element by element before writing it."""
    out_span, spans = span(out), [span(t) for t in reads]
    if not out_span:
        return run
    same_strides = in_place is not None and reads[in_place] is not None and reads[in_place].stride() == out.stride()

    def into(out, *reads):
        lo = out.data_ptr()
        hi = lo + out_span
        for k, (t, n) in enumerate(zip(reads, spans)):
            if n and t.data_ptr() < hi and lo < t.data_ptr() + n:
                if k == in_place and same_strides and t.data_ptr() == lo:
                    continue
                fresh = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
                return out.copy_(run(fresh, *reads))
        return run(out, *reads)
    return into


def write_out(out: Tensor, into, *args):
    """``into(*args)``, a kernel's write of ``out``, as PyTorch's out= ops write: an inference tensor refused
    outside inference mode first, and out's version bumped after (the write is invisible to autograd: a
    backward that saved out's old values then raises instead of using the new ones). Returns what ``into``
    returns."""
    check_writable(out)
    result = into(*args)
    torch.autograd.graph.increment_version(out)
    return result


def is_same_tensor(out: Tensor, t: Optional[Tensor]) -> bool:
    """Whether ``t`` is ``out`` itself: the same first element, shape and strides (an in-place write)."""
    return t is not None and out.data_ptr() == t.data_ptr() and out.shape == t.shape and out.stride() == t.stride()


def activation_backward(grad: Tensor, activation: Optional[str], output: Optional[Tensor], pre_activation) -> Tensor:
    """The gradient through a fused epilogue's activation, by aten: ReLU's from the saved ``output``,
    SiLU's and GELU's from the pre-activation value, which ``pre_activation()`` recomputes (the fused ops
    do not keep it)."""
    if activation is None:
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, output, 0)
    z = pre_activation()
    return torch.ops.aten.silu_backward(grad, z) if activation == "silu" else torch.ops.aten.gelu_backward(grad, z)


def check_writable(out: Tensor) -> None:
    """PyTorch's refusal to write into an inference tensor outside inference mode (a kernel's write would
    slip past it), with PyTorch's words."""
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed. You can make "
                           "a clone to get a normal tensor before doing inplace update.")


def suggest_memory_format(x: Tensor) -> torch.memory_format:
    """aten's ``Tensor.suggest_memory_format()`` (not bound in Python): the layout F.group_norm gives its
    output for input ``x``. channels_last for a 4-D tensor (channels_last_3d: 5-D) whose strides order its
    dims N, H, W, C (N, D, H, W, C), dense or not; contiguous_format otherwise, and where size-1 dims make
    both orders fit (c10's ``is_channels_last_strides_2d_s4`` and ``_3d_s5``, step for step)."""
    rank = x.dim()
    if rank not in (4, 5):
        return torch.contiguous_format
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    low = 0
    for d in (1, *range(rank - 1, 1, -1), 0):  # innermost first: C, W, H, (D,) N
        if sizes[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return torch.contiguous_format
        low = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return torch.channels_last if rank == 4 else torch.channels_last_3d


def format_strides(shape, fmt: torch.memory_format) -> tuple:
    """The strides of ``torch.empty(shape, memory_format=fmt)`` (arithmetic where no size is 0: making a
    meta tensor costs ~10 us)."""
    if 0 in shape:
        return torch.empty(shape, memory_format=fmt, device="meta").stride()
    rank = len(shape)
    order = range(rank - 1, -1, -1)  # innermost first
    if fmt != torch.contiguous_format:
        order = (1, *range(rank - 1, 1, -1), 0)  # C, (D,) H, W innermost first, then N
    strides, step = [0] * rank, 1
    for d in order:
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def aten_layout_plan(x: Tensor):
    """:func:`aten_layout` as a function, decided once for every tensor of ``x``'s shape and strides."""
    fmt = suggest_memory_format(x)
    strides = format_strides(x.shape, fmt)
    if x.stride() == strides:
        return _same
    if x.is_contiguous(memory_format=fmt):
        return lambda t: t.as_strided(t.shape, strides)
    return lambda t: t.contiguous(memory_format=fmt)


def _same(t: Tensor) -> Tensor:
    return t


def aten_layout(x: Tensor) -> Tensor:
    """x with the strides of F.group_norm's output for x (dense in :func:`suggest_memory_format`, with that
    format's own strides): x itself where it has them; a view where x is dense in that format but differs
    in the strides of size-1 dims (they address nothing); else a copy. A kernel that allocates its output
    with ``empty_like`` then returns what F.group_norm returns."""
    if x.is_contiguous() and 1 not in x.shape and 0 not in x.shape:  # the common case, decided quickly
        return x
    fmt = suggest_memory_format(x)
    strides = format_strides(x.shape, fmt)
    if x.stride() == strides:
        return x
    if x.is_contiguous(memory_format=fmt):
        return x.as_strided(x.shape, strides)
    return x.contiguous(memory_format=fmt)


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
