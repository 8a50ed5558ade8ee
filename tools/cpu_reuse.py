"""The CPU kernels against eager PyTorch, with fresh outputs and with ``out=`` reuse, in one run.

Two ways of calling, each timed call by call (wall clock, medians):

- back to back: the op alone in a loop. glibc hands a freed output's pages back to the next call, so a
  fresh output costs little here;
- in a sampling loop: each call follows other work that allocates and frees (a small convolutional
  model's forward on a tensor of the op's size, ``--work model``, or a ``torch.randn`` of that size,
  ``--work randn``), as in a diffusion sampler. A fresh output then often lands on pages the kernel
  touches first, and pays their page faults; an ``out=`` buffer reused every call does not. Whether
  it does depends on glibc's heap at that moment (its adaptive mmap and trim thresholds): the minor page
  faults per call are printed beside each time.

Providers: eager PyTorch, vlfast with a fresh output, with ``out=`` a buffer reused every call, and with
``out=`` the input itself (in place: the output's lines are in the cache, just read, so the write costs no
extra read of memory; the op's input changes from call to call, which does not change its time).

Cases: the GroupNorm + time-embedding add + SiLU forward at 4x256x64x64 float32, NCHW and channels_last,
against ``F.silu(F.group_norm(x + temb[..., None, None], 32, w, b))``; the DDPM step at 16x3x256x256
float32 (noise drawn in the kernel, no pred_original_sample) against the step as diffusers computes it
(``vlfast.reference.ddpm.ddpm_step_eager`` after a ``torch.randn``). Each round times every provider
back to back (providers interleaved, so that the machine's load falls on all of them alike); the
ratios are medians over rounds of the ratios within a round.

    python tools/cpu_reuse.py [--rounds 7] [--calls 15] [--work model|randn] [--cases gn,gn-cl,ddpm] [--json f]
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import vlfast
from vlfast.reference.ddpm import ddpm_step_eager
from vlfast.schedulers import DDPMScheduler

T = 500  # a mid-schedule DDPM step: noise is added


def _group_norm_case(channels_last: bool):
    """{provider: (fn(out_buffers) -> result, shape of the op's tensor)} of the GroupNorm case."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 64, 64, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b, temb = (torch.randn(*s, generator=g) for s in ((256,), (256,), (4, 256)))
    out, own = torch.empty_like(x), x.clone()

    def fused(o=None, x=x):
        return vlfast.ops.group_norm(x, 32, w, b, add=temb, activation="silu", out=o, backend="cpp")
    want = F.silu(F.group_norm(x.double() + temb.double()[..., None, None], 32, w.double(), b.double()))
    for got in (fused(), fused(out), fused(x.clone(), x.clone())):
        err = (got.double() - want).abs().max().item()
        assert err < 1e-4, f"group_norm disagrees with float64: {err:.3g}"
    return {"eager": lambda: F.silu(F.group_norm(x + temb[..., None, None], 32, w, b)),
            "vlfast": fused, "vlfast out=": lambda: fused(out), "vlfast out=x": lambda: fused(own, own)}, x


def _ddpm_case():
    sched = DDPMScheduler()
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(16, 3, 256, 256, generator=g), torch.randn(16, 3, 256, 256, generator=g)
    out, own = torch.empty_like(x), x.clone()

    def fused(o=None, x=x):
        return sched.step(eps, T, x, return_dict=False, return_pred_original_sample=False, out=o, backend="cpp")[0]
    # Checked at t = 0 (no noise) against float64: fresh, into out, in place.
    want = ddpm_step_eager(eps.double(), x.double(), ac.double(), 0, -1, None)[0]
    copy = x.clone()
    for sample, o in ((x, None), (x, out), (copy, copy)):
        got = sched.step(eps, 0, sample, return_dict=False, out=o, backend="cpp")[0]
        assert (got.double() - want).abs().max().item() < 1e-4, "ddpm step disagrees with float64"

    def eager():
        return ddpm_step_eager(eps, x, ac, T, T - 1, torch.randn(x.shape))[0]
    return {"eager": eager, "vlfast": fused, "vlfast out=": lambda: fused(out),
            "vlfast out=x": lambda: fused(own, own)}, x


def _work(kind: str, like: torch.Tensor):
    """Other work of a sampling loop, on a tensor of like's size: it allocates and frees."""
    if kind == "randn":
        return lambda: torch.randn(like.shape).sum()
    n = like.shape[0]
    c = 8
    hw = max(8, int((like.numel() / (n * c)) ** 0.5))
    z = torch.randn(n, 3, hw, hw)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(c, 3, 3, padding=1)).eval()

    def forward():
        with torch.no_grad():
            return model(z).sum()
    return forward


def _times(fn, calls: int, work=None) -> tuple[list, int]:
    """(seconds of each call, minor page faults during the calls)."""
    out, faults = [], 0
    for _ in range(calls):
        if work is not None:
            work()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return out, faults


def measure(case: str, rounds: int, calls: int, work_kind: str) -> dict:
    fns, like = _ddpm_case() if case == "ddpm" else _group_norm_case(case == "gn-cl")
    work = _work(work_kind, like)
    result = {}
    for mode, w in (("back to back", None), (f"after {work_kind}", work)):
        med = {name: [] for name in fns}
        faults = dict.fromkeys(fns, 0)
        for _ in range(rounds):
            for name, fn in fns.items():
                fn()
                times, n = _times(fn, calls, w)
                med[name].append(statistics.median(times) * 1e3)
                faults[name] += n
        ratios = {name: statistics.median(e / v for e, v in zip(med["eager"], med[name])) for name in fns}
        reuse = statistics.median(f / o for f, o in zip(med["vlfast"], med["vlfast out="]))
        result[mode] = {"ms": {k: statistics.median(v) for k, v in med.items()}, "vs eager": ratios,
                        "faults per call": {k: v / (rounds * calls) for k, v in faults.items()},
                        "fresh / out=": reuse}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--work", choices=["model", "randn"], default="model")
    p.add_argument("--cases", default="gn,gn-cl,ddpm")
    p.add_argument("--json")
    a = p.parse_args()
    names = {"gn": "group_norm 4x256x64x64 fp32 NCHW", "gn-cl": "group_norm 4x256x64x64 fp32 channels_last",
             "ddpm": "ddpm step 16x3x256x256 fp32"}
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cases": {}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {a.rounds} rounds x "
          f"{a.calls} calls")
    for case in a.cases.split(","):
        r = report["cases"][names[case]] = measure(case, a.rounds, a.calls, a.work)
        for mode, m in r.items():
            cells = ", ".join(f"{k} {m['ms'][k]:.2f} ms ({m['vs eager'][k]:.2f}x, "
                              f"{m['faults per call'][k]:.0f} faults)" for k in m["ms"])
            print(f"{names[case]}, {mode}: {cells}; fresh / out= {m['fresh / out=']:.2f}x", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
