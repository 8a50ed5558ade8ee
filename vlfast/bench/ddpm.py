"""DDPM sampling update: vlfast against the step as diffusers computes it, eager and compiled.

Bytes counted: read x_t, read the model output, write x_{t-1} (3 tensors; the
noise is drawn in the kernel). ``+x0`` also writes pred_original_sample.
"""

import torch

from .. import backends
from ..reference.ddpm import ddpm_step_eager
from ..schedulers import DDPMScheduler
from .common import Row, bench, bench_graph, compiled

GPU_SHAPES = [(64, 3, 32, 32), (16, 4, 64, 64), (16, 3, 256, 256), (8, 3, 1024, 1024)]
CPU_SHAPES = [(64, 3, 32, 32), (16, 4, 64, 64), (16, 3, 256, 256)]
T = 500  # a mid-schedule step, so noise is added


def _eager(ac, t):
    """diffusers' step as eager PyTorch; ``ac``: alphas_cumprod on the device (as diffusers keeps it)."""

    def step(eps, x):
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        return ddpm_step_eager(eps, x, ac, t, t - 1, noise)[0]
    return step


def _check(name, got, want, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (got.double() - want.double()).abs().max().item()
    if not err <= tol * (1 + want.double().abs().max().item()):
        raise AssertionError(f"{name} disagrees with the reference at t=0: max error {err:.3g}")


def cases(device: torch.device, shapes=None, dtypes=None, providers=None, compile_=True):
    """Yield (label, thunk) pairs; each thunk returns the Rows of one case."""
    shapes = shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    for shape in shapes:
        for dtype in dtypes:
            label = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
            yield label, (lambda s=shape, d=dtype, lab=label: _case(device, s, d, lab, providers, compile_))


def _case(device, shape, dtype, label, providers, compile_):
    sched = DDPMScheduler()
    ac = sched.alphas_cumprod.to(device)  # the scheduler keeps its own table on the host
    x = torch.randn(shape, device=device, dtype=dtype)
    eps = torch.randn(shape, device=device, dtype=dtype)
    nbytes = 3 * x.numel() * x.element_size()
    fns = {"eager": _eager(ac, T)}
    if compile_:
        fns["torch.compile"] = compiled(_eager(ac, T))
    # The reference (Philox in plain PyTorch) is the spec, not a contender; Triton on a CPU is the interpreter.
    skip = ("reference", "triton") if device.type == "cpu" else ("reference",)
    runnable = [b for b in backends.BACKENDS
                if b not in skip and not backends.not_supported_reasons(b, "ddpm_step", device=device, dtype=dtype)]
    for b in runnable:
        fns[f"vlfast-{b}"] = (lambda b=b: lambda e, s: sched.step(e, T, s, backend=b, return_dict=False,
                                                                   return_pred_original_sample=False)[0])()
    fns["vlfast+x0"] = lambda e, s: sched.step(e, T, s, return_dict=False)[0]
    if providers:
        fns = {k: v for k, v in fns.items() if k in providers or k == "eager"}

    # Every provider is checked at t = 0 (no noise) against the float64 eager step before it is timed.
    want = ddpm_step_eager(eps.double(), x.double(), ac.double(), 0, -1, None)[0]
    for name in fns:
        if name.startswith("vlfast"):
            b = name.split("-", 1)[1] if "-" in name else None
            got = sched.step(eps, 0, x, backend=b, return_dict=False)[0]
        else:
            got = ddpm_step_eager(eps, x, ac, 0, -1, None)[0]
        _check(name, got, want, dtype)

    rows = []
    for name, fn in fns.items():
        try:
            timing = bench(lambda fn=fn: fn(eps, x), device)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
            rows.append(Row("ddpm_step", label, str(dtype), name, None, nbytes, extra={"error": repr(e)[:200]}))
            continue
        rows.append(Row("ddpm_step", label, str(dtype), name, timing, nbytes))
    if device.type == "cuda" and shape == GPU_SHAPES[0]:
        rows += _graph_rows(sched, ac, x, eps, label, dtype, nbytes)
    return rows


def _graph_rows(sched, ac, x, eps, label, dtype, nbytes):
    """Inside a CUDA graph: vlfast's step, the eager step and one elementwise kernel; per-call Python overhead."""
    state = torch.zeros(2, dtype=torch.int64, device=x.device)
    sched._rng_state = state
    noise = torch.randn_like(x)
    out = torch.empty_like(x)
    graph_fns = {
        "graph:vlfast": lambda: sched.step(eps, T, x, return_dict=False, return_pred_original_sample=False),
        "graph:eager": lambda: ddpm_step_eager(eps, x, ac, T, T - 1, noise),
        "graph:one elementwise kernel": lambda: torch.add(x, eps, alpha=0.5, out=out),
    }
    rows = []
    for name, fn in graph_fns.items():
        try:
            rows.append(Row("ddpm_step", label, str(dtype), name, bench_graph(fn), nbytes))
        except Exception as e:  # noqa: BLE001
            rows.append(Row("ddpm_step", label, str(dtype), name, None, nbytes, extra={"error": repr(e)[:200]}))
    return rows
