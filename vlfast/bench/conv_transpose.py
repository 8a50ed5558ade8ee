"""Transposed convolution (nn.ConvTranspose2d forward, bias included): vlfast against cuDNN and torch.compile.

The eight cases of the shared anchors, float32 and bfloat16, NCHW and channels_last; forward+backward
for the k2 s2 (U-Net up-conv) cases; and the U-Net "up-conv + concat" step: cuDNN then ``torch.cat``
against vlfast writing straight into a channel slice of the concat buffer (``out=``).
FLOPs counted: 2 * N * H * W * Cin * Cout/groups * kh * kw (every tap of every input pixel). Bytes
counted: read x and the weight, write y once. Every provider's output is checked against an fp32
cuDNN/CPU result (TF32 off) before it is timed.
"""

import functools
import os

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.conv_transpose import conv_transpose2d
from .common import Row, bench, bench_graph, compiled, conv_flops_table, matmul_tflops

# name: (N, Cin, Cout, H=W, k, stride, padding, output_padding)
ANCHOR_CASES = {
    "N8 1024-512 32 k2s2": (8, 1024, 512, 32, 2, 2, 0, 0),
    "N8 512-256 64 k2s2": (8, 512, 256, 64, 2, 2, 0, 0),
    "N8 128-64 128 k2s2": (8, 128, 64, 128, 2, 2, 0, 0),
    "N8 256-128 64 k4s2p1": (8, 256, 128, 64, 4, 2, 1, 0),
    "N16 512-256 16 k4s2p1": (16, 512, 256, 16, 4, 2, 1, 0),
    "N8 64-3 128 k4s2p1": (8, 64, 3, 128, 4, 2, 1, 0),
    "N8 21-21 16 k64s32p16": (8, 21, 21, 16, 64, 32, 16, 0),
    "N8 256-256 32 k3s2p1op1": (8, 256, 256, 32, 3, 2, 1, 1),
}
# (dtype, channels_last): the anchors' columns.
GPU_VARIANTS = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
CPU_CASES = {"N2 64-32 16 k2s2": (2, 64, 32, 16, 2, 2, 0, 0)}  # one: torch.compile alone costs seconds
CONCAT_CASE = "N8 1024-512 32 k2s2"  # + a 512-channel skip at 64x64


@functools.cache
def _runnable(device):
    """vlfast backends to time: Triton on a GPU; the reference entry on a CPU (Triton there only interprets)."""
    names = [bk for bk in backends.BACKENDS if bk != "reference"
             and not backends.not_supported_reasons(bk, "conv_transpose2d", device=device)
             and not (bk == "triton" and device.type == "cpu")]
    return names or ["reference"]


def cases(device: torch.device, shapes=None, dtypes=None, providers=None, compile_=True, extra=None):
    """Yield (label, thunk) pairs; each thunk returns the Rows of one case (all providers).

    ``extra(geo=, args=, device=, dtype=, channels_last=, names=)``, where given, returns more providers
    for one case, {name: fn(x, w, b)}, timed forward only (the tuning probes of tools/probes.py);
    ``geo``: the case's (N, Cin, Cout, H, k, stride, padding, output_padding), ``args``: its
    stride/padding/output_padding keywords, ``names``: the providers already in the case.
    """
    if device.type == "cuda":
        todo = [(name, geo, dt, cl) for name, geo in (shapes or ANCHOR_CASES).items() for dt, cl in GPU_VARIANTS]
    else:
        todo = [(name, geo, torch.float32, False) for name, geo in (shapes or CPU_CASES).items()]
    for name, geo, dtype, cl in todo:
        if dtypes and dtype not in dtypes:
            continue
        label = f"{name} {str(dtype).replace('torch.', '')}{' NHWC' if cl else ''}"
        yield label, (lambda g=geo, d=dtype, cl=cl, lab=label: _case(device, g, d, cl, lab, providers, compile_,
                                                                     extra))
    if device.type == "cuda" and CONCAT_CASE in (shapes or ANCHOR_CASES) and (not dtypes or torch.bfloat16 in dtypes):
        label = f"{CONCAT_CASE} + cat bfloat16 NHWC"
        yield label, (lambda: _concat_case(device, ANCHOR_CASES[CONCAT_CASE], label, providers))


def _make(device, geo, dtype, channels_last):
    n, cin, cout, h, k, s, p, op = geo
    x = torch.randn(n, cin, h, h, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(cin, cout, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, device=device, dtype=dtype)
    return x, w, b, dict(stride=s, padding=p, output_padding=op)


def _counts(geo, x, w, y):
    n, cin, cout, h, k = geo[:5]
    flops = 2 * n * h * h * cin * cout * k * k
    nbytes = (x.numel() + w.numel() + y.numel()) * x.element_size()
    return flops, nbytes


def _mismatch(run, want, dtype):
    """Why the output of ``run()`` is wrong (None: it agrees with the fp32 reference). A failing provider
    is reported in the table, not timed."""
    tol = 2e-2 if dtype == torch.float32 else 4e-2  # fp32 may use TF32 (cuDNN's default), as the kernel does
    try:
        err = (run().float() - want).abs().max().item()
    except Exception as e:  # noqa: BLE001
        return repr(e)[:200]
    if not err <= tol * (1 + want.abs().max().item()):
        return f"disagrees with the float32 reference: max error {err:.3g}"
    return None


def _fp32_reference(x, w, b, geo_args):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return F.conv_transpose2d(x.float(), w.float(), b.float(), **geo_args)
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _case(device, geo, dtype, channels_last, label, providers, compile_, extra=None):
    x, w, b, args = _make(device, geo, dtype, channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def eager(x, w, b):
        return F.conv_transpose2d(x, w, b, **args)

    fns = {"eager": eager}
    # Inductor hands transposed convolutions to the same aten kernel (cuDNN, oneDNN) as eager: compile
    # only the layout that matters most on a GPU (bf16 channels_last), and not on a CPU, where it costs
    # seconds per shape.
    if compile_ and device.type == "cuda" and dtype == torch.bfloat16 and channels_last:
        fns["torch.compile"] = compiled(eager)
    for bk in _runnable(device):
        fns[f"vlfast-{bk}"] = lambda x, w, b, bk=bk: conv_transpose2d(x, w, b, **args, backend=bk)
    if device.type == "cuda":  # what auto runs: Triton's forward only where measured faster, PyTorch's backward
        fns["vlfast-auto"] = lambda x, w, b: conv_transpose2d(x, w, b, **args, backend="auto")
    probes = extra(geo=geo, args=args, device=device, dtype=dtype, channels_last=channels_last,
                   names=tuple(fns)) if extra else {}
    fns.update(probes)
    if providers:
        fns = {k: v for k, v in fns.items() if k in providers or k == "eager"}
    want = _fp32_reference(x, w, b, args)
    flops, nbytes = _counts(geo, x, w, want)
    rows = []
    for name, fn in fns.items():
        why = _mismatch(lambda fn=fn: fn(x, w, b), want, dtype)
        if why:
            rows.append(Row("conv_transpose2d fwd", label, str(dtype), name, None, nbytes, flops, {"error": why}))
            continue
        rows.append(_time("fwd", label, dtype, name, lambda fn=fn: fn(x, w, b), device, nbytes, flops))
        if device.type == "cuda" and channels_last and dtype == torch.bfloat16 and name != "torch.compile":
            # 20 calls replayed from one CUDA graph: the GPU time without the host's (warm L2, though).
            rows.append(_time("fwd", label, dtype, f"graph:{name}", lambda fn=fn: fn(x, w, b), device, nbytes,
                              flops, graph=True))
        # Forward + backward of the U-Net up-conv cases, bf16 (torch.compile's backward only on request).
        if (device.type == "cuda" and geo[4] == geo[5] == 2 and dtype == torch.bfloat16 and name not in probes
                and (name != "torch.compile" or os.environ.get("VLFAST_BENCH_COMPILE_BWD"))):
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            dy = torch.randn_like(want, dtype=dtype)

            def step(fn=fn, leaves=leaves, dy=dy):
                fn(*leaves).backward(dy)
            rows.append(_time("fwd+bwd", label, dtype, name, step, device, 3 * nbytes, 3 * flops))
    return rows


def _concat_case(device, geo, label, providers):
    """cat([up(x), skip], 1) by cuDNN + torch.cat, against the up-conv writing into the concat buffer."""
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16
    x, w, b, args = _make(device, geo, dtype, True)
    cout = w.shape[1]
    oh = (geo[3] - 1) * geo[5] - 2 * geo[6] + geo[4] + geo[7]
    skip = torch.randn(geo[0], cout, oh, oh, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    buf = torch.empty(geo[0], 2 * cout, oh, oh, device=device, dtype=dtype).to(memory_format=torch.channels_last)

    def eager():
        return torch.cat([F.conv_transpose2d(x, w, b, **args), skip], 1)

    def vlfast_copy():  # the skip still has to be copied in, as torch.cat does
        conv_transpose2d(x, w, b, **args, out=buf[:, :cout])
        buf[:, cout:].copy_(skip)
        return buf

    def vlfast_in_place():  # the encoder already wrote its output into buf[:, cout:]
        conv_transpose2d(x, w, b, **args, out=buf[:, :cout])
        return buf

    fns = {"eager": eager, "vlfast-triton out=": vlfast_copy, "vlfast-triton out=, skip in place": vlfast_in_place}
    if providers:
        fns = {k: v for k, v in fns.items() if k in providers or k == "eager"}
    want = torch.cat([_fp32_reference(x, w, b, args), skip.float()], 1)
    flops, nbytes = _counts(geo, x, w, want[:, :cout])
    rows = []
    for name, fn in fns.items():
        buf[:, cout:].copy_(skip)
        why = _mismatch(fn, want, dtype)
        if why:
            rows.append(Row("conv_transpose2d fwd + cat", label, str(dtype), name, None, nbytes, flops, {"error": why}))
            continue
        rows.append(_time("fwd + cat", label, dtype, name, fn, device, nbytes + 2 * skip.numel() * 2, flops))
    return rows


def _time(op, label, dtype, name, fn, device, nbytes, flops, graph=False):
    try:
        timing = bench_graph(fn) if graph else bench(fn, device)
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
        return Row(f"conv_transpose2d {op}", label, str(dtype), name, None, nbytes, flops,
                   extra={"error": repr(e)[:200]})
    tflops = flops / (timing.median * 1e-6) / 1e12
    peak = matmul_tflops(device.type)
    extra = {"tflops": tflops, "matmul_tflops": peak, "pct_matmul": 100 * tflops / peak if peak else None}
    return Row(f"conv_transpose2d {op}", label, str(dtype), name, timing, nbytes, flops, extra=extra)


def flops_table(rows) -> str:
    """TFLOP/s, % of the measured bf16 matmul rate and speed-up over eager and torch.compile, per row."""
    return conv_flops_table(rows, "conv_transpose2d")
