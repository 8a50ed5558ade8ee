"""Hardware counters of the kernels whose speed is in question, for Nsight Compute.

Run under ncu (gpu_check.sh's "profile" step does)::

    ncu --profile-from-start off --clock-control none --csv --page raw --metrics <list> \
        python tools/profile_kernels.py [--cases a,b]

Each case runs once to compile and warm up, then once between ``cudaProfilerStart`` and
``cudaProfilerStop``, so ncu records only that call's kernels (labelled by an NVTX range). Without ncu
it just runs the cases. ``--summarize ncu.csv`` prints one line per profiled kernel.
"""

import argparse
import csv
import math

import torch

import vlfast
from vlfast.ops import _overrides
from vlfast.ops.conv_transpose_triton import conv_transpose2d_into


def _gn(n, c, h, w, channels_last, backend, **force):
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    add = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    if force:  # the Triton launcher with knobs of vlfast.ops._overrides, e.g. group_norm_single_max=0
        from vlfast.ops.group_norm_triton import group_norm_fwd

        def forced():
            with _overrides.use(**force):
                return group_norm_fwd(x, 32, wt, b, 1e-5, add=add, activation="silu")
        return forced
    return lambda: vlfast.ops.group_norm(x, 32, wt, b, add=add, activation="silu", backend=backend)


def _gn_train(n, c, h, w, channels_last):
    """Forward + backward through ``backend="auto"`` (the Triton forward, the CUDA backward)."""
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    wt = torch.randn(c, device="cuda", requires_grad=True)
    b = torch.randn(c, device="cuda", requires_grad=True)
    add = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    return lambda: vlfast.ops.group_norm(x, 32, wt, b, add=add, activation="silu").backward(dy)


def _conv(n, cin, cout, h, k, s, p, kernel, nchw=False):
    x = torch.randn(n, cin, h, h, device="cuda", dtype=torch.bfloat16)
    x = x if nchw else x.to(memory_format=torch.channels_last)
    w = (torch.randn(cin, cout, k, k, device="cuda") / math.sqrt(cin * k * k)).to(torch.bfloat16)
    b = torch.randn(cout, device="cuda", dtype=torch.bfloat16)
    oh = (h - 1) * s - 2 * p + k
    out = torch.empty(n, cout, oh, oh, device="cuda", dtype=torch.bfloat16)
    out = out if nchw else out.to(memory_format=torch.channels_last)

    def run():
        with _overrides.use(conv_transpose_kernel=kernel):
            return conv_transpose2d_into(out, x, w, b, (s, s), (p, p), (0, 0), 1, (1, 1), 0)
    return run


# name: thunk factory. GroupNorm: ddpm pattern, bf16 (the 16x256x64x64 target and the slow rows).
CASES = {
    "gn-16x256x64-nchw-triton": lambda: _gn(16, 256, 64, 64, False, "triton"),
    "gn-16x256x64-nhwc-triton": lambda: _gn(16, 256, 64, 64, True, "triton"),
    "gn-64x128x32-nhwc-triton": lambda: _gn(64, 128, 32, 32, True, "triton"),
    "gn-16x256x64-nchw-cuda": lambda: _gn(16, 256, 64, 64, False, "cuda"),
    "gn-4x128x256-nchw-triton-split": lambda: _gn(4, 128, 256, 256, False, None, group_norm_single_max=0),
    "gn-train-16x256x64-nchw-auto": lambda: _gn_train(16, 256, 64, 64, False),
    "gn-train-16x256x64-nhwc-auto": lambda: _gn_train(16, 256, 64, 64, True),
    "conv-N8-1024-512-32-k2s2-subpixel": lambda: _conv(8, 1024, 512, 32, 2, 2, 0, "subpixel"),
    "conv-N8-1024-512-32-k2s2-subpixel-nchw": lambda: _conv(8, 1024, 512, 32, 2, 2, 0, "subpixel", nchw=True),
    "conv-N8-128-64-128-k2s2-subpixel": lambda: _conv(8, 128, 64, 128, 2, 2, 0, "subpixel"),
    "conv-N8-256-128-64-k4s2p1-subpixel": lambda: _conv(8, 256, 128, 64, 4, 2, 1, "subpixel"),
    "conv-N8-256-128-64-k4s2p1-phase": lambda: _conv(8, 256, 128, 64, 4, 2, 1, "phase"),
    "conv-N8-21-21-16-k64s32p16-subpixel": lambda: _conv(8, 21, 21, 16, 64, 32, 16, "subpixel"),
}


# (column of ncu's raw page, short name) printed by --summarize; missing columns are skipped.
SUMMARY = [("gpu__time_duration.sum", "time"), ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram%"),
           ("dram__bytes_read.sum", "read"), ("dram__bytes_write.sum", "written"),
           ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm%"),
           ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy%"),
           ("launch__registers_per_thread", "regs"), ("launch__grid_size", "grid"), ("launch__block_size", "block"),
           ("lts__t_sector_hit_rate.pct", "L2 hit%"),
           ("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "ld sectors"),
           ("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "ld requests")]


def summarize(path: str) -> None:
    """One line per kernel of an ncu ``--csv --page raw`` report (its other output lines are skipped)."""
    with open(path) as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if len(rows) < 3:
        print(f"no kernels in {path}")
        return
    head, units = rows[0], rows[1]
    col = {name: i for i, name in enumerate(head)}
    nvtx = next((i for i, name in enumerate(head) if "nvtx" in name.lower() or "Range" in name), None)
    for r in rows[2:]:
        label = r[nvtx] if nvtx is not None else ""
        cells = [f"{short}={r[col[m]]}{units[col[m]] if units[col[m]] not in ('', '%') else ''}"
                 for m, short in SUMMARY if m in col]
        print(f"{label:40.40s} {r[col.get('Kernel Name', 0)][:48]:48s} " + " ".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--summarize", metavar="CSV", help="print an ncu raw CSV report, one line per kernel, and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    if args.summarize:
        summarize(args.summarize)
        return
    names = [c for c in args.cases.split(",") if c] or list(CASES)
    for name in names:
        run = CASES[name]()
        with torch.set_grad_enabled(name.startswith("gn-train")):
            run()  # compile, warm up
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(name)
            torch.cuda.profiler.start()
            run()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            torch.cuda.nvtx.range_pop()
        print(f"profiled {name}", flush=True)


if __name__ == "__main__":
    main()
