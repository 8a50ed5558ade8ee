"""Benchmarks of every vlfast op against eager PyTorch and torch.compile (``python -m vlfast bench``)."""

import argparse
import signal
import threading

from .common import Row, copy_bandwidth, format_table, headline, machine, write_json

OPS = ("ddpm", "group_norm", "conv_transpose", "conv2d", "models")


def run(device, ops=OPS, *, shapes=None, dtypes=None, providers=None, compile_=True, progress=True, extra=None):
    """Run the benchmarks of ``ops`` on ``device``; returns (machine info, copy GB/s, rows).

    ``extra``: {op: factory} of more providers to time beside the user-facing ones (the repository's
    tuning probes, tools/probes.py); see the ``cases`` of the op's module for what a factory is given.
    """
    import importlib

    from tqdm.auto import tqdm

    info = machine(device)
    copy_gbps = copy_bandwidth(device)
    todo = []
    for op in ops:
        mod = importlib.import_module(f"vlfast.bench.{op}")
        more = {"extra": extra[op]} if extra and op in extra else {}
        todo += list(mod.cases(device, shapes=shapes, dtypes=dtypes, providers=providers, compile_=compile_, **more))
    rows: list[Row] = []
    # A time limit (SIGTERM, as `timeout` sends) or Ctrl-C ends the run after the cases done so far,
    # which are still reported: a long run cut short keeps what it measured.
    old = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        for label, thunk in tqdm(todo, desc="vlfast bench", unit="case", disable=not progress):
            rows += thunk()
    except KeyboardInterrupt:
        info["interrupted"] = f"stopped after {len(rows)} rows, at case {label!r}"
        print(f"\nbench: {info['interrupted']}", flush=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return info, copy_gbps, rows


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def table(rows, copy_gbps: float) -> str:
    """Medians with 20th/80th percentiles, GB/s, % of the measured copy rate and speed-ups."""
    base = {}
    for r in rows:
        if r.timing and r.provider in ("eager", "torch.compile", "graph:eager"):
            base[(r.op, r.case, r.provider)] = r.timing.median
    lines = []
    for r in rows:
        if r.timing is None:
            lines.append([r.op, r.case, r.provider, "failed", "", "", "", "", ""])
            continue
        t = r.timing.median
        gbps = r.bytes / (t * 1e-6) / 1e9 if r.bytes else 0.0
        eager = base.get((r.op, r.case, "graph:eager" if r.provider.startswith("graph:") else "eager"))
        comp = base.get((r.op, r.case, "torch.compile"))
        lines.append([r.op, r.case, r.provider, f"{t:.1f}", f"{r.timing.p20:.1f}-{r.timing.p80:.1f}",
                      f"{gbps:.0f}", f"{100 * gbps / copy_gbps:.0f}%",
                      f"{eager / t:.2f}x" if eager else "-",
                      f"{comp / t:.2f}x" if comp and not r.provider.startswith("graph:") else "-"])
    headers = ["op", "case", "provider", "median us", "p20-p80", "GB/s", "% copy", "vs eager", "vs compile"]
    return format_table(headers, lines)


def report(info: dict, copy_gbps: float, rows, json_path: str | None = None) -> None:
    """Print the machine, the measured copy rate and the table; write the rows as JSON if asked."""
    print(headline(info))
    print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    print(table(rows, copy_gbps))
    for r in rows:
        if r.timing is None:
            print(f"failed: {r.op} {r.case} {r.provider}: {r.extra.get('error', 'no timing')}")
    if json_path:
        write_json(json_path, info, rows, {"copy_gbps": copy_gbps})


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every ``benchmarks/bench_<op>.py`` takes: --device, --dtypes, --no-compile, --json."""
    import torch
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    return p


def script(op: str, args: argparse.Namespace, shapes=None, extra=None):
    """Run one op's benchmarks as parsed by :func:`parser`, print and save them; returns the rows.
    ``extra``: a factory of more providers for ``op`` (see :func:`run`)."""
    import torch
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    info, copy_gbps, rows = run(torch.device(args.device), (op,), shapes=shapes, dtypes=dtypes,
                                compile_=not args.no_compile, extra={op: extra} if extra else None)
    report(info, copy_gbps, rows, args.json)
    return rows
