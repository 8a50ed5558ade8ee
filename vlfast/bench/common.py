"""Timing, machine description and reporting shared by every vlfast benchmark."""

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import tuning


@dataclass
class Timing:
    """Median and 20th/80th percentiles of one provider, in microseconds, and what the vlfast ops ran while
    it was timed (:meth:`vlfast.tuning.Recorder.summary`: per op and direction the tuning key and backend
    of most calls; empty where no vlfast op ran): what ``python -m vlfast tuning build`` makes tables of."""
    median: float
    p20: float
    p80: float
    ran: dict = field(default_factory=dict)


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    provider: str
    timing: Timing
    bytes: int = 0
    flops: int = 0
    extra: dict = field(default_factory=dict)


def bench(fn, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Time ``fn`` (no arguments): CUDA events via triton.testing.do_bench on a GPU, a wall clock on the CPU."""
    with tuning.recording() as calls:
        timing = _bench(fn, device, warmup_ms, rep_ms)
    timing.ran = calls.summary()
    return timing


def _bench(fn, device: torch.device, warmup_ms: float, rep_ms: float) -> Timing:
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med * 1e3, p20 * 1e3, p80 * 1e3)
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(5, min(200, int(rep_ms * 1e-3 / once)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), q[1], q[7])


def compiled(fn):
    """``torch.compile(fn)`` specialised to the shapes it first sees, as a user compiling one model gets.

    Dynamo's caches are reset first: the benchmarks compile the same Python function for many
    shapes, and from the second shape on Dynamo would switch to slower shape-generic kernels
    (and after eight, fall back to eager).
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def bench_graph(fn, repeats: int = 20) -> Timing:
    """Per-call time of ``fn`` captured ``repeats`` times back to back in one CUDA graph."""
    from triton.testing import do_bench
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with tuning.recording() as calls:
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                fn()
    med, p20, p80 = do_bench(graph.replay, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return Timing(med * 1e3 / repeats, p20 * 1e3 / repeats, p80 * 1e3 / repeats, calls.summary())


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy rate in GB/s, counting bytes read plus bytes written."""
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t.median * 1e-6) / 1e9


def _git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nvml(index: int) -> dict:
    """Clocks, power limit, driver, memory, utilisation, temperature and power draw of a GPU through
    nvidia-ml-py ({"nvml": why} where it is missing)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
        }
        # The device's state now (memory, utilisation over the last sample period, temperature, power
        # draw): each read on its own, as some boards do not report every one.
        state = {
            "memory_used_mib": lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "memory_total_mib": lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20,
            "gpu_util_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_util_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(h).memory,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_draw_w": lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
        }
        for key, read in state.items():
            try:
                info[key] = read()
            except pynvml.NVMLError:
                pass
        pynvml.nvmlShutdown()
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
    except Exception as e:  # noqa: BLE001 - any NVML failure only loses the extra columns
        return {"nvml": f"unavailable ({type(e).__name__})"}


def machine(device: torch.device) -> dict:
    """What the numbers were measured on: device name, versions, git SHA."""
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "git_sha": _git_sha(), "date": time.strftime("%Y-%m-%d")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    cuda=torch.version.cuda, **_nvml(idx))
    else:
        info.update(name=tuning.cpu_name(), threads=torch.get_num_threads())
    return info


def headline(info: dict) -> str:
    if info["device"] == "cuda":
        clocks = (f", SM {info.get('sm_clock_mhz', '?')}/{info.get('max_sm_clock_mhz', '?')} MHz, "
                  f"power limit {info.get('power_limit_w', '?')} W, driver {info.get('driver', '?')}")
        return f"{info['name']} ({info['sms']} SMs{clocks}); torch {info['torch']}, triton {info['triton']}"
    return f"CPU: {info['name']}, {info['threads']} threads; torch {info['torch']}, triton {info['triton']}"


def write_json(path: str, info: dict, rows: list[Row], extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, **(extra or {}), "rows": [asdict(r) for r in rows]}, f, indent=1)


def format_table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


def matmul_tflops(device_type: str = "cuda", n: int = 8192) -> float:
    """Measured bf16 ``torch.matmul`` rate (n x n x n) in TFLOP/s; 0 on a CPU (not measured there)."""
    if device_type != "cuda":
        return 0.0
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ b, torch.device("cuda"))
    return 2 * n**3 / (t.median * 1e-6) / 1e12


def conv_flops_table(rows, op: str, ran: bool = False) -> str:
    """TFLOP/s, % of the measured bf16 matmul rate and speed-ups over eager and torch.compile of the rows of
    ``op`` (a convolution); ``ran`` adds the backend each vlfast forward ran (the rows' ``extra["ran"]``)."""
    base = {(r.op, r.case, r.provider): r.timing.median for r in rows if r.timing}
    lines = []
    for r in rows:
        if not r.op.startswith(op):
            continue
        if r.timing is None:
            lines.append([r.op, r.case, r.provider, "failed"] + [""] * (6 if ran else 5))
            continue
        graph = r.provider.startswith("graph:")  # graph rows against the graph-replayed eager (cuDNN)
        t, eager = r.timing.median, base.get((r.op, r.case, "graph:eager" if graph else "eager"))
        comp = None if graph else base.get((r.op, r.case, "torch.compile"))
        pct = r.extra.get("pct_matmul")
        lines.append([r.op, r.case, r.provider, f"{t:.1f}", f"{r.timing.p20:.1f}-{r.timing.p80:.1f}",
                      f"{r.extra['tflops']:.3g}", f"{pct:.0f}%" if pct is not None else "-",
                      f"{eager / t:.2f}x" if eager else "-", f"{comp / t:.2f}x" if comp else "-"]
                     + ([r.extra.get("ran", "")] if ran else []))
    headers = ["op", "case", "provider", "median us", "p20-p80", "TFLOP/s", "% matmul", "vs eager", "vs compile"]
    return format_table(headers + (["vlfast ran"] if ran else []), lines)
