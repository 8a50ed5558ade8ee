"""GroupNorm + time embedding (+ scale-shift) + SiLU: vlfast against eager PyTorch and torch.compile.

Patterns: "ddpm" = silu(group_norm(x + temb)), "adm" = silu(group_norm(x) * (1 + scale) + shift).
Bytes counted: forward, read x and write y (2 tensors); forward+backward, also read x and dy and
write dx (5 tensors).
"""

import os

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.group_norm import group_norm
from .common import Row, bench, bench_graph, compiled

G = 32
# (N, C, H, W, dtype, channels_last): the shapes of the shared anchors.
GPU_CASES = [
    (64, 128, 32, 32, torch.float32, False), (64, 128, 32, 32, torch.bfloat16, False),
    (64, 128, 32, 32, torch.bfloat16, True), (16, 256, 64, 64, torch.float32, False),
    (16, 256, 64, 64, torch.bfloat16, False), (16, 256, 64, 64, torch.bfloat16, True),
    (64, 256, 16, 16, torch.bfloat16, False), (8, 512, 32, 32, torch.bfloat16, False),
    (4, 128, 256, 256, torch.bfloat16, False), (4, 128, 256, 256, torch.bfloat16, True),
]
CPU_CASES = [(4, 256, 64, 64, torch.float32, False), (16, 128, 32, 32, torch.float32, False),
             (4, 256, 64, 64, torch.float32, True)]


def eager(pattern):
    def ddpm(x, w, b, temb, scale, shift):
        return F.silu(F.group_norm(x + temb[:, :, None, None], G, w, b))

    def adm(x, w, b, temb, scale, shift):
        return F.silu(F.group_norm(x, G, w, b) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    return ddpm if pattern == "ddpm" else adm


def fused(pattern, backend):
    def ddpm(x, w, b, temb, scale, shift):
        return group_norm(x, G, w, b, add=temb, activation="silu", backend=backend)

    def adm(x, w, b, temb, scale, shift):
        return group_norm(x, G, w, b, scale=scale, shift=shift, activation="silu", backend=backend)
    return ddpm if pattern == "ddpm" else adm


def cases(device: torch.device, shapes=None, dtypes=None, providers=None, compile_=True, extra=None):
    """Yield (label, thunk) pairs; each thunk returns the Rows of one case (both patterns).

    ``extra(pattern=, device=, dtype=, channels_last=, runnable=)``, where given, returns more providers
    for one case and pattern, {name: fn(x, w, b, temb, scale, shift)}, timed forward only (the tuning
    probes of tools/probes.py); ``runnable``: the vlfast backends timed here.
    """
    todo = shapes or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    for n, c, h, w, dtype, cl in todo:
        if dtypes and dtype not in dtypes:
            continue
        label = f"{n}x{c}x{h}x{w} {str(dtype).replace('torch.', '')}{' NHWC' if cl else ''}"
        yield label, (lambda s=(n, c, h, w), d=dtype, cl=cl, lab=label: _case(device, s, d, cl, lab, providers,
                                                                             compile_, extra))


def _case(device, shape, dtype, channels_last, label, providers, compile_, extra=None):
    n, c = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
    temb, scale, shift = (torch.randn(n, c, device=device, dtype=dtype) * 0.5 for _ in range(3))
    dy = torch.randn_like(x)
    args = (x, w, b, temb, scale, shift)
    size = x.numel() * x.element_size()
    runnable = [bk for bk in backends.BACKENDS if bk != "reference"
                and not backends.not_supported_reasons(bk, "group_norm", device=device, dtype=dtype)
                and not (bk == "triton" and device.type == "cpu")]
    rows = []
    for pattern in ("ddpm", "adm"):
        fns = {"eager": eager(pattern)}
        # On a GPU, torch.compile is timed in bf16 (the dtype of the targets): each compile costs seconds.
        if compile_ and not (device.type == "cuda" and dtype == torch.float32):
            fns["torch.compile"] = compiled(eager(pattern))
        fns.update({f"vlfast-{bk}": fused(pattern, bk) for bk in runnable})
        probes = extra(pattern=pattern, device=device, dtype=dtype, channels_last=channels_last,
                       runnable=tuple(runnable)) if extra else {}
        fns.update(probes)
        if providers:
            fns = {k: v for k, v in fns.items() if k in providers or k == "eager"}
        want = eager(pattern)(*(t.double() for t in args))
        for name, fn in fns.items():
            tol = 2e-3 if dtype == torch.float32 else 6e-2
            try:
                err = (fn(*args).double() - want).abs().max().item()
            except Exception as e:  # noqa: BLE001 - a provider that fails is reported, not timed
                err, why = float("nan"), repr(e)[:200]
            else:
                why = f"disagrees with the float64 reference: max error {err:.3g}"
            if not err <= tol * (1 + want.abs().max().item()):
                rows.append(Row(f"group_norm {pattern} fwd", label, str(dtype), name, None, 2 * size,
                                extra={"error": why}))
                continue
            rows.append(_time(f"{pattern} fwd", label, dtype, name, lambda fn=fn: fn(*args), device, 2 * size))
            if device.type == "cuda" and name != "torch.compile":
                # 20 calls replayed from one CUDA graph: no host launch cost (but a warm L2: inputs that
                # fit in L2 stay there between calls, where do_bench flushes it).
                rows.append(_time(f"{pattern} fwd", label, dtype, f"graph:{name}", lambda fn=fn: fn(*args), device,
                                  2 * size, graph=True))
            # Forward + backward on a GPU, against eager (torch.compile's backward compile is timed
            # only with VLFAST_BENCH_COMPILE_BWD=1: it costs minutes over all shapes).
            if device.type == "cuda" and name not in probes and (
                    name != "torch.compile" or os.environ.get("VLFAST_BENCH_COMPILE_BWD")):
                leaves = [t.detach().requires_grad_() for t in args]

                def step(fn=fn, leaves=leaves):
                    fn(*leaves).backward(dy)
                rows.append(_time(f"{pattern} fwd+bwd", label, dtype, name, step, device, 5 * size))
    return rows


def _time(op, label, dtype, name, fn, device, nbytes, graph=False):
    try:
        timing = bench_graph(fn) if graph else bench(fn, device)
        return Row(f"group_norm {op}", label, str(dtype), name, timing, nbytes)
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
        return Row(f"group_norm {op}", label, str(dtype), name, None, nbytes, extra={"error": repr(e)[:200]})
