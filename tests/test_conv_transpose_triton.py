"""The Triton launchers of the transposed convolution (vlfast/ops/conv_transpose_triton.py) on every path,
forced where the heuristics would pick another: both forward kernels on every geometry they take, the
backward GEMMs against aten, the kernel choice and the cell ranges. The public entry on every backend is
tests/test_conv_transpose.py, whose cases and helpers these share."""

import pytest
import torch

from vlfast.reference import conv_transpose as ref

from conftest import DEVICES, DT, runnable
from test_conv_transpose import ACTS, CASES, case_id, check, conv_args, make, reference, skip_unsupported


def triton_device():
    """Where the Triton kernels run here: a GPU, else CPU tensors under the interpreter (else skip)."""
    devices = [d for d in DEVICES if "triton" in runnable(d, "conv_transpose2d")]
    if not devices:
        pytest.skip("no device runs the Triton kernels here")
    return "cuda" if "cuda" in devices else devices[0]


KERNELS = [(i, k) for i, c in enumerate(CASES) for k in ("subpixel", "phase")
           if k == "phase" or c["dilation"] == (1, 1)]


@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("layouts", ["nchw-nchw", "nhwc-nhwc", "nchw-nhwc"])
@pytest.mark.parametrize("i,kernel", KERNELS, ids=[f"{case_id(CASES[i])}-{k}" for i, k in KERNELS])
def test_each_kernel(i, kernel, layouts, dtype):
    """Both Triton kernels on every geometry they take (not only the one ``kernel_for`` picks), into a
    poisoned output whose layout may differ from the input's."""
    from vlfast.ops import _overrides
    from vlfast.activations import CODE as ACT_CODE
    from vlfast.ops.conv_transpose_triton import conv_transpose2d_into
    device = triton_device()
    skip_unsupported(device, "triton", dtype)
    c = CASES[i]
    activation, bias = ACTS[(i + 1) % 4], i % 3 != 1
    x, w, b = make(c, dtype, device, bias, layouts.startswith("nhwc"), seed=100 + i)
    hi, lo = reference(x, w, b, c, activation, dtype)
    out = torch.full(hi.shape, float("nan"), dtype=dtype, device=device)
    if layouts.endswith("nhwc"):
        out = out.to(memory_format=torch.channels_last)
    with _overrides.use(conv_transpose_kernel=kernel):
        conv_transpose2d_into(out, x, w, b, c["stride"], c["padding"], c["output_padding"], c["groups"],
                              c["dilation"], ACT_CODE[activation])
    check(out, hi, lo, dtype)


BACKWARD = [i for i, c in enumerate(CASES) if c["dilation"] == (1, 1)]


@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("i", BACKWARD, ids=[case_id(CASES[i]) for i in BACKWARD])
def test_triton_backward_kernels(i, layout, dtype):
    """dx and dweight of the Triton backward against aten.convolution_backward in float64 (dgrad: a GEMM
    over input pixels, wgrad: split partials over output cells), poisoned outputs, any dy strides."""
    from vlfast.ops.conv_transpose_triton import conv_transpose2d_backward
    device = triton_device()
    skip_unsupported(device, "triton", dtype)
    c = CASES[i]
    x, w, _ = make(c, dtype, device, False, layout == "nhwc", seed=200 + i)
    y = ref.conv_transpose2d(x.double(), w.double(), None, **conv_args(c))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(device, dtype)
    if layout == "nhwc":
        dy = dy.to(memory_format=torch.channels_last)
    dx, dw = conv_transpose2d_backward(dy, x, w, c["stride"], c["padding"], c["groups"], (True, True))
    want = torch.ops.aten.convolution_backward(dy.double(), x.double(), w.double(), None, c["stride"], c["padding"],
                                               c["dilation"], True, c["output_padding"], c["groups"],
                                               [True, True, False])
    lo = torch.ops.aten.convolution_backward(dy.float(), x.float(), w.float(), None, c["stride"], c["padding"],
                                             c["dilation"], True, c["output_padding"], c["groups"],
                                             [True, True, False])
    for name, got, hi, low in (("dx", dx, want[0], lo[0]), ("dweight", dw, want[1], lo[1])):
        assert got.shape == hi.shape and got.dtype == dtype, name
        check(got, hi, low.to(dtype), dtype, name)


def test_kernel_choice_and_cells():
    from vlfast.ops.conv_transpose_triton import _cells, kernel_for
    assert kernel_for((2, 2), (2, 2), (1, 1)) == "subpixel"         # U-Net up-conv: one tap
    assert kernel_for((4, 4), (2, 2), (1, 1)) == "subpixel"         # VAE k4 s2 p1: 2 x 2 taps, no zero
    assert kernel_for((64, 64), (32, 32), (1, 1)) == "subpixel"     # FCN-32s
    assert kernel_for((3, 3), (2, 2), (1, 1)) == "subpixel"         # 16 multiplies for 9 taps
    assert kernel_for((1, 1), (3, 3), (1, 1)) == "phase"            # 9 multiplies for 1 tap
    assert kernel_for((3, 3), (1, 1), (2, 2)) == "phase"            # dilation
    # (taps, first cell, cells): k4 s2 p1 on 5 pixels -> 10 outputs in cells 0..5, the first and last cropped
    assert _cells(5, 10, 4, 2, 1) == (2, 0, 6)
    assert _cells(5, 10, 2, 2, 0) == (1, 0, 5)                      # k == s: cells are the input pixels
    assert _cells(5, 11, 2, 2, 0) == (1, 0, 5)                      # output_padding: cell 5 has no input
    assert _cells(16, 512, 64, 32, 16) == (2, 0, 17)                # FCN-32s
    from vlfast.ops import _overrides
    from vlfast.ops.conv_transpose_triton import conv_transpose2d_into
    x, w, b = make(CASES[10], torch.float32, "cpu")
    with pytest.raises(ValueError, match="kernel"), _overrides.use(conv_transpose_kernel="subpixel"):
        conv_transpose2d_into(torch.empty(2, 5, 9, 9), x, w, b, (1, 1), (2, 2), (0, 0), 1, (2, 2), 0)
