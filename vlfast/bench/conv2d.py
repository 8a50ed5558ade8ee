"""Convolution + bias + activation (+ residual, + a write into a concat buffer): vlfast against cuDNN and
torch.compile, on the dilated layers the op is for and on ordinary layers where ``auto`` should keep cuDNN.

GPU cases (:data:`GPU_CASES`), each in bf16 channels_last, bf16 NCHW and float32 NCHW (TF32 allowed, as
cuDNN's default), all cases of one layout before the next, so that a run cut short keeps the main layout:

- the context module of Yu & Koltun (64 channels, N8 128x128, 3x3 + ReLU at dilations 1, 1, 2, 4, 8, 16, 1):
  each distinct layer as a case (the three dilation-1 layers are one case), and the module end to end;
- N8 256 -> 256 at 64x64, 3x3 + ReLU at dilations 1, 2, 4, 8 (the shared anchors' dilated rows);
- DeepLabv3's ASPP: N8 2048 -> 256 at 32x32, 3x3 at rates 6, 12, 18 and a 1x1 branch, + ReLU, into one
  concat buffer of 4 x 256 channels (vlfast: ``out=`` channel slices; eager: four convs + ``torch.cat``);
- a ResNet-style 3x3 + residual + ReLU (N8 256 at 64x64);
- the DDPM U-Net's ordinary 3x3 convs (N64 128 at 32x32, N64 256 at 16x16, bias only).

Providers in one run: eager PyTorch (``F.conv2d`` + activation [+ residual] [+ ``torch.cat``]),
``torch.compile`` of that function (bf16 channels_last, on the cases marked for it: seconds per compile),
``vlfast-auto`` and every vlfast backend that can run the case forced (``vlfast-triton``; a forced backend
that refuses a geometry gets no row). On bf16 channels_last also: each forward replayed 20 times from one
CUDA graph (``graph:`` rows, no host time) and, on the cases marked for it, forward + backward.
On a CPU: the tiny :data:`CPU_CASES` in float32; Triton only under ``TRITON_INTERPRET=1``.

FLOPs counted: 2 * N * OH * OW * Cout * Cin/groups * KH * KW per conv, every tap (zero padding included),
3x that for forward + backward. Bytes counted: the input, the weights, the residual and the output once.
Every output (and, for forward + backward, every gradient) is checked against a float32 result with TF32
off before it is timed: at most twice eager PyTorch's error in the same dtype, or a small tolerance.
"""

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import backends
from ..activations import activate
from ..ops.conv2d import conv2d
from .common import Row, bench, bench_graph, compiled, conv_flops_table, matmul_tflops

OP = "conv2d"  # the op's name in vlfast.backends


class Case(NamedTuple):
    group: str  # what ``benchmarks/bench_conv2d.py --cases`` selects
    n: int
    cin: int
    cout: int
    hw: int
    dilations: tuple  # "chain"/"residual": the layers, in sequence; "aspp": the branches' rates (0: the 1x1)
    kind: str = "chain"  # "chain", "residual" (+ a residual before the activation), "aspp"
    activation: str | None = "relu"
    compile: bool = False  # time torch.compile (bf16 channels_last on a GPU): seconds per case
    backward: bool = False  # time forward + backward (bf16 channels_last on a GPU; not ASPP: out= is inference)


CONTEXT = (1, 1, 2, 4, 8, 16, 1)  # Yu & Koltun's context module, all 3x3 here
# In order of importance. torch.compile and forward + backward on a few cases only: the whole run must fit
# gpu_check.sh's time limit (each compile costs seconds, each new geometry a Triton and a cuDNN tuning).
GPU_CASES = {
    **{f"ctx N8 64 128 d{d}": Case("context", 8, 64, 64, 128, (d,), backward=d == 4) for d in (1, 2, 4, 8, 16)},
    "ctx module N8 64 128": Case("module", 8, 64, 64, 128, CONTEXT, compile=True, backward=True),
    **{f"N8 256 64 d{d}": Case("dilated", 8, 256, 256, 64, (d,), backward=d == 2) for d in (1, 2, 4, 8)},
    "ASPP N8 2048-4x256 32": Case("aspp", 8, 2048, 256, 32, (0, 6, 12, 18), "aspp", compile=True),
    "res N8 256 64": Case("resnet", 8, 256, 256, 64, (1,), "residual", compile=True, backward=True),
    "ddpm N64 128 32": Case("ddpm", 64, 128, 128, 32, (1,), activation=None, backward=True),
    "ddpm N64 256 16": Case("ddpm", 64, 256, 256, 16, (1,), activation=None),
}
# (dtype, channels_last), most important first.
GPU_VARIANTS = [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)]
# Tiny: the CPU run exercises every kind of case; torch.compile (seconds per shape) on one.
CPU_CASES = {
    "ctx N1 16 32 d2": Case("context", 1, 16, 16, 32, (2,), backward=True),
    "ctx module N1 16 32": Case("module", 1, 16, 16, 32, CONTEXT, backward=True),
    "ASPP N1 64-4x16 16": Case("aspp", 1, 64, 16, 16, (0, 2, 4, 6), "aspp"),
    "res N2 16 32": Case("resnet", 2, 16, 16, 32, (1,), "residual", compile=True, backward=True),
}
GROUPS = ("context", "module", "dilated", "aspp", "resnet", "ddpm")


def cases(device: torch.device, shapes=None, dtypes=None, providers=None, compile_=True, extra=None):
    """Yield (label, thunk) pairs; each thunk returns the Rows of one case and layout (all providers).

    ``shapes``: {name: :class:`Case`} to run instead of the device's defaults. ``extra(case=, device=,
    dtype=, channels_last=, fused=, names=)``, where given, returns more providers for one case, {name:
    fn(*tensors, picks=None)}, timed forward only (the tuning probes of tools/probes.py); ``fused(backend)``
    makes the case's vlfast function, ``names`` the providers already in the case.
    """
    todo = shapes or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    variants = GPU_VARIANTS if device.type == "cuda" else [(torch.float32, False)]
    for dtype, cl in variants:
        if dtypes and dtype not in dtypes:
            continue
        for name, case in todo.items():
            if case.kind == "aspp" and dtype == torch.float32 and device.type == "cuda":
                continue  # fp32 ASPP adds nothing the fp32 layer rows do not show
            label = f"{name} {str(dtype).replace('torch.', '')}{' NHWC' if cl else ''}"
            yield label, (lambda c=case, d=dtype, cl=cl, lab=label: _case(device, c, d, cl, lab, providers,
                                                                           compile_, extra))


# ---------------------------------------------------------------- the problem of one case
def _layers(case):
    """(kernel size, dilation) of each conv: 3x3 at each dilation, a rate of 0 is ASPP's 1x1 branch."""
    return [(1, 1) if d == 0 else (3, d) for d in case.dilations]


def _make(device, case, dtype, channels_last):
    """[x, w0, b0, w1, b1, ..., (residual)]: He-scaled weights, so that activations keep their size
    through the seven ReLU layers of the context module."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = randn(case.n, case.cin, case.hw, case.hw).contiguous(memory_format=fmt)
    tensors = [x]
    cin = case.cin
    for k, _ in _layers(case):
        w = randn(case.cout, cin, k, k, scale=(2 / (cin * k * k)) ** 0.5).contiguous(memory_format=fmt)
        tensors += [w, randn(case.cout, scale=0.1)]
        if case.kind != "aspp":
            cin = case.cout
    if case.kind == "residual":
        tensors.append(randn(case.n, case.cout, case.hw, case.hw).contiguous(memory_format=fmt))
    return tensors


def _functions(case, buf=None):
    """(eager, fused(backend)): functions of the tensors of :func:`_make`. ``buf``: ASPP's concat buffer."""
    layers, act, cout = _layers(case), case.activation, case.cout
    nl = len(layers)

    def eager(x, *p):
        if case.kind == "aspp":
            return torch.cat([activate(F.conv2d(x, p[2 * i], p[2 * i + 1], padding=d * (k // 2), dilation=d), act)
                              for i, (k, d) in enumerate(layers)], 1)
        for i, (k, d) in enumerate(layers):
            x = F.conv2d(x, p[2 * i], p[2 * i + 1], padding=d * (k // 2), dilation=d)
            if case.kind == "residual":
                x = x + p[2 * nl]
            x = activate(x, act)
        return x

    def fused(backend):
        def fn(x, *p, picks=None):  # picks: a list to which each conv's forward backend is appended
            res = p[2 * nl] if case.kind == "residual" else None
            for i, (k, d) in enumerate(layers):
                y = conv2d(x, p[2 * i], p[2 * i + 1], padding=d * (k // 2), dilation=d, activation=act,
                           residual=res, out=None if buf is None else buf[:, i * cout:(i + 1) * cout],
                           backend=backend)
                x = x if buf is not None else y
                if picks is not None:
                    picks.append(backends.last_backend(OP))
            return x if buf is None else buf
        return fn
    return eager, fused


def _ran(picks) -> str:
    """What a vlfast provider ran, e.g. "triton" or "3 reference + 4 triton"."""
    names = sorted(set(picks))
    return names[0] if len(names) == 1 else " + ".join(f"{picks.count(n)} {n}" for n in names)


def _counts(case, tensors, y):
    """(FLOPs, bytes) of one forward: every tap of every conv; input, weights, residual, output once."""
    macs, cin = 0, case.cin
    for k, _ in _layers(case):
        macs += case.n * case.hw * case.hw * case.cout * cin * k * k
        if case.kind != "aspp":
            cin = case.cout
    nbytes = sum(t.numel() for t in tensors) + y.numel()
    return 2 * macs, nbytes * y.element_size()


def _fp32(fn, tensors, grad=None):
    """fn on float32 copies with TF32 off: the reference output, and the reference gradients for ``grad``."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        leaves = [t.detach().float().requires_grad_(grad is not None) for t in tensors]
        y = fn(*leaves)
        if grad is None:
            return y.detach(), None
        y.backward(grad.float())
        return y.detach(), [t.grad for t in leaves]
    finally:
        torch.backends.cudnn.allow_tf32 = old


class _Check:
    """Whether outputs agree with the float32 reference, by the tests' rule for low precision: a provider's
    max error may be twice eager PyTorch's own in the same dtype (the first output checked), or a small
    fraction of the reference's largest value (fp32: TF32 allowed, cuDNN's default, as the kernels may)."""

    def __init__(self, dtype):
        self.tol, self.eager = (2e-2 if dtype == torch.float32 else 4e-2), None

    def __call__(self, got, want, i=0):
        """Why ``got`` (output ``i`` of the provider) is wrong; None where it agrees."""
        err = (got.float() - want).abs().max().item()
        limit = self.tol * (1 + want.abs().max().item())
        if self.eager is None or len(self.eager) <= i:
            self.eager = (self.eager or []) + [err]  # eager itself: the baseline
            return None
        if not err <= max(limit, 2 * self.eager[i]):
            return f"disagrees with the float32 reference: max error {err:.3g} (eager's {self.eager[i]:.3g})"
        return None


def _unsupported(e: Exception) -> bool:
    """A forced backend refusing these inputs (it gets no row), rather than a failure."""
    return isinstance(e, RuntimeError) and str(e).startswith("vlfast: backend") and "cannot run" in str(e)


def _forced(device):
    """The vlfast backends to force beside ``auto``: those that run on ``device`` (Triton on a CPU only
    under TRITON_INTERPRET=1); the reference is what ``auto`` falls back to, not timed on its own."""
    return [bk for bk in backends.BACKENDS if bk != "reference"
            and not backends.not_supported_reasons(bk, OP, device=device)
            and not (bk == "triton" and device.type == "cpu" and not backends.interpret_mode())]


# ---------------------------------------------------------------- one case, every provider
def _case(device, case, dtype, channels_last, label, providers, compile_, extra=None):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gpu, nhwc16 = device.type == "cuda", dtype == torch.bfloat16 and channels_last
    tensors = _make(device, case, dtype, channels_last)
    buf = None
    if case.kind == "aspp":
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        buf = torch.empty(case.n, len(case.dilations) * case.cout, case.hw, case.hw, device=device, dtype=dtype,
                          memory_format=fmt)
    eager, fused = _functions(case, buf)
    fns = {"eager": eager}
    if compile_ and case.compile and (nhwc16 or not gpu):
        fns["torch.compile"] = compiled(eager)
    fns["vlfast-auto"] = fused("auto")
    fns.update({f"vlfast-{bk}": fused(bk) for bk in _forced(device)})
    probes = extra(case=case, device=device, dtype=dtype, channels_last=channels_last, fused=fused,
                   names=tuple(fns)) if extra else {}
    fns.update(probes)
    if providers:
        fns = {k: v for k, v in fns.items() if k in providers or k == "eager"}
    want, _ = _fp32(eager, tensors)
    flops, nbytes = _counts(case, tensors, want)
    op = "conv2d fwd + cat" if case.kind == "aspp" else "conv2d fwd"
    rows, check = [], _Check(dtype)
    for name, fn in fns.items():
        if buf is not None:
            buf.fill_(float("nan"))  # a slice left unwritten shows
        picks = [] if name.startswith("vlfast") else None
        try:
            why = check(fn(*tensors, **({} if picks is None else {"picks": picks})), want)
        except Exception as e:  # noqa: BLE001 - a provider that fails is reported, not timed
            if _unsupported(e):
                continue
            why = repr(e)[:200]
        if why:
            rows.append(Row(op, label, str(dtype), name, None, nbytes, flops, {"error": why}))
            continue
        ran = {"ran": _ran(picks)} if picks else {}
        rows.append(_time(op, label, dtype, name, lambda fn=fn: fn(*tensors), device, nbytes, flops, ran))
        if gpu and nhwc16 and name != "torch.compile" and name not in probes:
            # 20 calls replayed from one CUDA graph: the GPU time without the host's (warm L2, though).
            rows.append(_time(op, label, dtype, f"graph:{name}", lambda fn=fn: fn(*tensors), device, nbytes, flops,
                              ran, graph=True))
    if case.backward and case.kind != "aspp" and (nhwc16 or not gpu):
        users = {k: v for k, v in fns.items() if k not in probes}
        rows += _backward_rows(device, case, dtype, label, users, tensors, want, flops, nbytes)
    return rows


def _backward_rows(device, case, dtype, label, fns, tensors, want, flops, nbytes):
    """Forward + backward of each provider (torch.compile's only with VLFAST_BENCH_COMPILE_BWD=1: its
    backward compile costs more than the rest of a case), gradients checked first."""
    dy = torch.randn_like(want).to(dtype)
    _, want_grads = _fp32(fns["eager"], tensors, dy)
    rows, check = [], _Check(dtype)
    for name, fn in fns.items():
        if name == "torch.compile" and not os.environ.get("VLFAST_BENCH_COMPILE_BWD"):
            continue
        leaves = [t.detach().requires_grad_() for t in tensors]
        try:
            fn(*leaves).backward(dy)
            why = next((f"grad of input {i}: {w}" for i, (t, g) in enumerate(zip(leaves, want_grads))
                        if (w := check(t.grad, g, i))), None)
        except Exception as e:  # noqa: BLE001
            if _unsupported(e):
                continue
            why = repr(e)[:200]
        if why:
            rows.append(Row("conv2d fwd+bwd", label, str(dtype), name, None, 3 * nbytes, 3 * flops, {"error": why}))
            continue

        def step(fn=fn, leaves=leaves):
            fn(*leaves).backward(dy)
        rows.append(_time("conv2d fwd+bwd", label, dtype, name, step, device, 3 * nbytes, 3 * flops))
    return rows


def _time(op, label, dtype, name, fn, device, nbytes, flops, more=None, graph=False):
    try:
        timing = bench_graph(fn) if graph else bench(fn, device)
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
        return Row(op, label, str(dtype), name, None, nbytes, flops, extra={"error": repr(e)[:200]})
    tflops = flops / (timing.median * 1e-6) / 1e12
    peak = matmul_tflops(device.type)
    extra = {"tflops": tflops, "matmul_tflops": peak, "pct_matmul": 100 * tflops / peak if peak else None,
             **(more or {})}
    return Row(op, label, str(dtype), name, timing, nbytes, flops, extra=extra)


def flops_table(rows) -> str:
    """TFLOP/s, % of the measured bf16 matmul rate, speed-ups over eager and torch.compile and the backend
    each vlfast forward ran, per row."""
    return conv_flops_table(rows, "conv2d", ran=True)
