"""Host time per call: what `do_bench`'s per-call medians hide and what a CUDA graph removes.

`triton.testing.do_bench` flushes the L2 with a ~85 µs kernel before each timed call, so a call whose
host work (Python, argument checks, the launcher) takes H µs shows as GPU time + max(0, H - flush):
small shapes look host-bound or not depending on that window. This script measures H directly: it
times many back-to-back calls on the host clock and synchronises once at the end, so at small shapes
(GPU time of a few µs) the wall time per call is the host time. Run on a GPU::

    python tools/host_overhead.py [--calls 500] [--json out.json]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

import vlfast


def _per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _group_norm_cases():
    n, c, h = 64, 256, 16
    x = torch.randn(n, c, h, h, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(c, device="cuda", dtype=torch.bfloat16), torch.randn(c, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)

    def eager():
        return F.silu(F.group_norm(x + temb[:, :, None, None], 32, w, b))

    fns = {"eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    for bk in ("triton", "cuda"):
        fns[f"vlfast-{bk}"] = lambda bk=bk: vlfast.ops.group_norm(x, 32, w, b, add=temb, activation="silu", backend=bk)
    return f"group_norm ddpm fwd {n}x{c}x{h}x{h} bf16", fns


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    label, fns = _group_norm_cases()
    for name, fn in fns.items():
        try:
            us = _per_call_us(fn, args.calls)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{label:45s} {name:16s} failed: {e!r}"[:200])
            continue
        rows.append({"case": label, "provider": name, "host_us_per_call": us})
        print(f"{label:45s} {name:16s} {us:8.1f} µs a call (back to back, one sync)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
