"""The Triton launchers of the transposed convolution (vlfast/ops/conv_transpose_triton.py) on every path,
forced where the heuristics would pick another: both forward kernels on every geometry they take, the
backward GEMMs against aten, the kernel choice and the cell ranges. The public entry on every backend is
tests/test_conv_transpose.py, whose cases and helpers these share."""

import pytest
import torch

from vlfast.reference import conv_transpose as ref

from conftest import DEVICES, DT, runnable
from test_conv_transpose import (ACTS, CASES, case, case_id, check, conv_args, make, reference, skip_unsupported,
                                 TF32_SETTINGS, TF32_SEQUENCE, tf32_settings_restored)


def triton_device():
    """Where the Triton kernels run here: a GPU, else CPU tensors under the interpreter (else skip)."""
    devices = [d for d in DEVICES if "triton" in runnable(d, "conv_transpose2d")]
    if not devices:
        pytest.skip("no device runs the Triton kernels here")
    return "cuda" if "cuda" in devices else devices[0]


def kernels_taking(c):
    """The forward kernels that take case c: the phase kernel always, the sub-pixel one where k % s == 0."""
    from vlfast.ops.conv_transpose_triton import subpixel_takes
    return [k for k in ("subpixel", "phase") if k == "phase" or subpixel_takes(c["k"], c["stride"], c["dilation"])]


KERNELS = [(i, k) for i, c in enumerate(CASES) for k in kernels_taking(c)]


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
    assert kernel_for((3, 3), (2, 2), (1, 1)) == "phase"            # padded zero taps: 0 * inf would be NaN
    assert kernel_for((4, 2), (2, 2), (1, 1)) == "subpixel" and kernel_for((4, 3), (2, 2), (1, 1)) == "phase"
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
    x, w, b = make(CASES[6], torch.float32, "cpu")  # k3 s2
    with pytest.raises(ValueError, match="multiples of the stride"), _overrides.use(conv_transpose_kernel="subpixel"):
        conv_transpose2d_into(torch.empty(2, 4, 8, 6), x, w, b, (2, 2), (1, 1), (1, 1), 1, (1, 1), 0)


# ---------------------------------------------------------------- drop-in parity
# Small geometries for the parity tests below (the interpreter runs them in well under a second each).
SMALL = {"k4s2p1": case(1, 5, 3, 3, 4, 4, 2, 1), "k3s2": case(2, 5, 3, 3, 2, 3, 2),
         "k5s3p1": case(1, 3, 4, 3, 3, 5, 3, 1), "k2s2": case(1, 5, 3, 3, 4, 2, 2),
         "k3s2p1op1": case(1, 5, 3, 3, 3, 3, 2, 1, 1), "k4s2op1": case(1, 3, 4, 2, 3, 4, 2, 0, 1),
         "k2s2-tiny": case(1, 2, 2, 2, 2, 2, 2), "k2s2-tiny3": case(1, 3, 2, 2, 3, 2, 2)}


def conv(x, w, b, c, kernel, **kw):
    """The public entry on the Triton backend with ``kernel`` forced (the reference where kernel is None)."""
    from vlfast.ops import _overrides
    from vlfast.ops.conv_transpose import conv_transpose2d
    with _overrides.use(conv_transpose_kernel=kernel):
        return conv_transpose2d(x, w, b, **conv_args(c), backend="reference" if kernel is None else "triton", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT.get)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("kernel", ["subpixel", "phase"])
def test_weight_written_through_data_is_seen(kernel, layout, dtype):
    """Writes through ``.data`` (``p.data.copy_``, ``torch._foreach_mul_`` on ``[p.data]``, as EMA copies do)
    leave the version counter as it was: the next call, forward and Triton backward, must still see them."""
    device = triton_device()
    c = SMALL["k4s2p1"]
    x, w, b = make(c, dtype, device, channels_last=layout == "nhwc", seed=3)
    w = torch.nn.Parameter(w)
    w2 = make(c, dtype, device, seed=4)[1]
    with torch.no_grad():
        conv(x, w, b, c, kernel)  # arranges (and formerly cached) the first weight
        w.data.copy_(w2)
        check(conv(x, w, b, c, kernel), *reference(x, w2, b, c, None, dtype), dtype)
        torch._foreach_mul_([w.data], -0.5)
        check(conv(x, w, b, c, kernel), *reference(x, w2 * -0.5, b, c, None, dtype), dtype)
    if dtype != torch.float32:
        return  # the backward below: float32 (the interpreter's time)
    # The Triton backward (dgrad against the arranged weight) after another .data write.
    xg = x.detach().requires_grad_()
    conv(xg, w, b, c, kernel).sum().backward()
    w.data.copy_(w2)
    xg.grad = None
    conv(xg, w, b, c, kernel).sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref.conv_transpose2d(x64, w2.double(), b.double(), **conv_args(c)).sum().backward()
    check(xg.grad, x64.grad, x64.grad.to(dtype), dtype, "grad input")


@pytest.mark.parametrize("kernel", ["subpixel", "phase", None], ids=["subpixel", "phase", "reference"])
def test_inference_mode_weights(kernel):
    """Weights made under torch.inference_mode() (a model built for serving): calls inside it and, where
    PyTorch allows it, outside (no_grad); with gradients recorded PyTorch refuses, and so does vlfast."""
    device = triton_device()
    c = SMALL["k4s2p1"]
    with torch.inference_mode():
        x, w, b = make(c, torch.float32, device)
        w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
        want = ref.conv_transpose2d(x.double(), w.double(), b.double(), **conv_args(c))
        check(conv(x, w, b, c, kernel), want, want.float(), torch.float32)
    x = x.clone()
    with torch.no_grad():
        check(conv(x, w, b, c, kernel), want, want.float(), torch.float32)
        out = torch.empty(want.shape, device=device)
        check(conv(x, w, b, c, kernel, out=out), want, want.float(), torch.float32)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        torch.nn.functional.conv_transpose2d(x, w, b, **conv_args(c))
    with pytest.raises(RuntimeError, match="Inference tensors"):
        conv(x, w, b, c, kernel)


def test_threads_with_different_weights(monkeypatch):
    """An inference server: 4 threads x many calls, each thread its own weights, on the eager planned path,
    against the reference."""
    import threading

    import vlfast.kernels.conv_transpose as kernels
    from vlfast.ops.conv_transpose import OP, conv_transpose2d
    device = triton_device()
    if device == "cpu":  # Triton 3.9's interpreter patches triton.language per launch: one launch at a time
        lock = threading.Lock()

        class Serialised:
            def __init__(self, fn):
                self.fn = fn

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    with lock:
                        return self.fn[grid](*args, **kwargs)
                return launch
        for name in ("conv_transpose2d_subpixel_kernel", "conv_transpose2d_phase_kernel"):
            monkeypatch.setattr(kernels, name, Serialised(getattr(kernels, name)))
    OP.plans.clear()  # plans made before the patch would launch unserialised
    errors = []

    def work(seed):
        # Each thread cycles through weights of its own: calls repeat weights and interleave with the others'.
        c = SMALL["k2s2-tiny"] if seed % 2 else SMALL["k2s2-tiny3"]  # two plans (the phase kernel: slow here)
        x, _, b = make(c, torch.float32, device, seed=seed)
        weights = [make(c, torch.float32, device, seed=100 * seed + i)[1] for i in range(4)]
        wants = [reference(x, w, b, c, None, torch.float32) for w in weights]
        try:
            for i in range(12):
                got = conv_transpose2d(x, weights[i % 4], b, **conv_args(c), backend="triton")
                check(got, *wants[i % 4], torch.float32)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        OP.plans.clear()
    assert not errors, errors


NAN_CASES = [(name, k) for name, c in SMALL.items() if "tiny" not in name for k in kernels_taking(c) + [None]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT.get)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name,kernel", NAN_CASES, ids=[f"{n}-{k or 'reference'}" for n, k in NAN_CASES])
def test_nan_and_inf_propagate_as_in_pytorch(name, kernel, layout, dtype):
    """An inf, a -inf and a NaN in the input: NaN where PyTorch has NaN, inf where it has inf, the other
    outputs finite and close (no padded zero tap or halo multiplies a real inf)."""
    device = triton_device()
    c = SMALL[name]
    x, w, b = make(c, dtype, device, channels_last=layout == "nhwc", seed=7)
    x[0, 0, 0, 1] = float("inf")
    x[-1, 1, -1, 0] = float("nan")
    x[0, -1, -1, -1] = float("-inf")
    got = conv(x, w, b, c, kernel, activation="relu")
    hi, lo = reference(x, w, b, c, "relu", dtype)
    assert torch.equal(got.isnan(), hi.isnan()), (got.isnan().sum(), hi.isnan().sum())
    assert torch.equal(torch.where(got.isinf(), got.double(), 0), torch.where(hi.isinf(), hi, 0))
    assert hi.isfinite().any() and not hi.isfinite().all()
    finite = hi.isfinite()
    check(torch.where(finite, got, 0), torch.where(finite, hi, 0), torch.where(finite, lo, 0), dtype)


def test_tf32_setting_read_at_every_call(monkeypatch):
    """float32 on CUDA: a plan follows PyTorch's TF32 setting as it is at each call (not at planning), read
    the way the installed torch wants it. Shown on CPU tensors taken for CUDA ones by the plan's rule and
    kernels that record their launch instead of running."""
    import vlfast.kernels.conv_transpose as kernels
    import vlfast.ops.conv_transpose_triton as ctt
    from vlfast.ops import igemm
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs["PRECISION"])
    for name in ("conv_transpose2d_subpixel_kernel", "conv_transpose2d_phase_kernel"):
        monkeypatch.setattr(kernels, name, Recorder())
    monkeypatch.setattr(ctt, "precision_rule", lambda dtype, device: igemm.precision_rule(dtype, torch.device("cuda")))
    for name in ("k4s2p1", "k3s2"):  # the sub-pixel and the phase kernel
        c = SMALL[name]
        geometry = (c["stride"], c["padding"], c["output_padding"], 1, c["dilation"], 0)
        x, w, b = make(c, torch.float32, "cpu")
        out = torch.empty(reference(x, w, b, c, None, torch.float32)[1].shape)
        run = ctt.plan_into(out, x, w, b, *geometry)
        seen.clear()
        with tf32_settings_restored():
            for setting in TF32_SETTINGS:
                setting()
                run(out, x, w, b)
        assert seen == [want for _, want in TF32_SEQUENCE][:len(TF32_SETTINGS)], seen
        with tf32_settings_restored(), monkeypatch.context() as m:  # 16-bit: no read, at planning or calls
            m.setattr(igemm, "cudnn_conv_tf32", lambda: pytest.fail("TF32 setting read for 16-bit inputs"))
            x, w, b, out = x.half(), w.half(), b.half(), out.half()
            ctt.plan_into(out, x, w, b, *geometry)(out, x, w, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("name", ["k3s2", "k3s2p1op1", "k5s3p1", "k4s2p1"])
def test_nan_and_inf_in_the_gradient_propagate_to_dx_as_in_pytorch(name):
    """The Triton dgrad against Wsp, whose padded zero taps (k not a multiple of s) must not meet an inf of dy."""
    from vlfast.ops.conv_transpose_triton import conv_transpose2d_backward
    device = triton_device()
    c = SMALL[name]
    x, w, _ = make(c, torch.float32, device, seed=9)
    y = ref.conv_transpose2d(x.double(), w.double(), None, **conv_args(c))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(device)
    dy[0, 0, 1, 2], dy[-1, -1, -1, -1], dy[0, 1, 0, 0] = float("inf"), float("nan"), float("-inf")
    dx, _ = conv_transpose2d_backward(dy, x, w, c["stride"], c["padding"], c["groups"], (True, False))
    want = torch.ops.aten.convolution_backward(dy.double(), x.double(), w.double(), None, c["stride"], c["padding"],
                                               c["dilation"], True, c["output_padding"], c["groups"],
                                               [True, False, False])[0]
    assert torch.equal(dx.isnan(), want.isnan()) and torch.equal(dx.isinf(), want.isinf())
    assert want.isfinite().any() and not want.isfinite().all()
    finite = want.isfinite()
    check(torch.where(finite, dx, 0), torch.where(finite, want, 0), torch.where(finite, want, 0).float(),
          torch.float32, "dx")
