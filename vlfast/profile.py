"""Where a model's time goes, eager and after ``vlfast.nn.convert`` (``python -m vlfast profile MODEL``).

:func:`profile_model` times the whole model per variant (forward, and forward + backward) and each module's
own time in a forward, through PyTorch's global module hooks: nothing is registered on the modules, so
``convert``'s fusions (which leave hooked modules alone) are those of an unprofiled model.
:func:`format_report` writes the text report and :func:`plot` the figure (matplotlib).

The result, as ``--json`` writes it (key names are stable; times in µs per forward or per step)::

    machine    the device as vlfast.bench.common.machine describes it, read after the runs (on a GPU its
               memory, utilisation, temperature and power then; on a CPU also "load_average", 1 minute)
    model      {"name", "class", "inputs": [{"shape": [...], "dtype"} or {"value": repr}, ...], "parameters",
               "flops": per forward, of the convolutions and linear layers}
    settings   {"device", "dtype", "channels_last", "batch", "compile", "backward", "conv2d", "iters"}
    limits     {"copy_gbps": measured device copy (read + write), "matmul_tflops": measured bf16 matmul
               (CUDA; 0 on a CPU)}
    variants   {"eager" | "vlfast" | "torch.compile" | "vlfast+compile": {"forward_us",
               "forward_backward_us" (None without backward), "max_abs_diff" (forward against eager's),
               "peak_memory_mib" (CUDA; None on a CPU)}}
    layers     {"eager" | "vlfast": [{"name" (qualified; the model itself "(model)"), "type" (class name),
               "vlfast" (a class of vlfast's), "shape" (output, "2x64x32x32"), "calls", "self_us", "share" (%),
               "flops", "bytes", "tflops", "gbps"}, ...]}: every module that ran, slowest first
    by_type    {"eager" | "vlfast": {type: self_us}}: the layers' self time summed by class name
    by_op      {"eager" | "vlfast": {category: us}}: forward + backward self time by op category
               (torch.profiler), with backward only; else {}

A module's self time is its time from call to return less its child modules' (a parent's own code, such
as a block that calls functional ops, counts as the parent's), summed over its calls in a forward
(``calls``), the median over the hooked forwards; shares are of the sum of all self times (about one
forward) and sum to 100. ``flops``: 2 x the multiply-adds of a ``Conv2d`` / ``ConvTranspose2d`` / ``Linear``
per forward; ``bytes``: input + output elements x element size of any other leaf module (norms,
activations, pooling); ``tflops`` / ``gbps`` are None where these are 0.
"""

import contextlib
import copy
import os
import statistics
import time
from collections import defaultdict

import torch
from torch import Tensor, nn

from .bench.common import bench, compiled, copy_bandwidth, format_table, headline, machine, matmul_tflops

__all__ = ["profile_model", "format_report", "plot"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_COPY_BYTES = 64 << 20  # the CPU's copy rate from a 64 MiB buffer: enough to leave the caches, quick
# torch.profiler op name -> category of the forward + backward table; the first match wins.
OP_CATEGORIES = (
    ("vlfast", ("vlfast::",)),
    ("convolution", ("conv",)),
    ("norm", ("norm",)),
    ("matmul/attention", ("mm", "matmul", "linear", "softmax", "attention")),
    ("copy/cat", ("copy", "cat", "clone", "contiguous", "_to_", "fill", "zero")),
)


def profile_model(model: nn.Module, inputs: tuple, *, device=None, dtype: torch.dtype | None = None,
                  channels_last: bool | None = None, compile_: bool = False, backward: bool = False,
                  conv2d: str = "dilated", iters: int = 5, name: str | None = None, log=None) -> dict:
    """Profile ``model(*inputs)`` eager, converted by ``vlfast.nn.convert(copy, conv2d=conv2d)`` and, with
    ``compile_``, both under ``torch.compile``; returns the dict the module docstring describes.

    ``model`` is not changed: each variant runs on a copy, moved to ``device`` (default: CUDA where present)
    and ``dtype`` (default bfloat16 on CUDA, float32 on a CPU), in ``channels_last`` (default on CUDA).
    Floating-point inputs take the dtype, integer ones (timesteps) stay as they are. Forward times run in
    eval mode without gradients; ``backward`` adds forward + backward in train mode, with the loss the mean
    square of every floating-point output. ``iters``: hooked forwards per variant for the layer times.
    ``log``: a function given a line of progress, or None.
    """
    from . import nn as vnn

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    channels_last = cuda if channels_last is None else channels_last
    say = log or (lambda msg: None)
    layout = {"memory_format": torch.channels_last} if channels_last else {}
    inputs = tuple(_to(a, device, dtype, channels_last) for a in inputs)

    say("measuring the device's copy" + (" and matmul rates" if cuda else " rate"))
    limits = {"copy_gbps": copy_bandwidth(device, *([] if cuda else [CPU_COPY_BYTES])),
              "matmul_tflops": matmul_tflops(device.type)}
    eager = copy.deepcopy(model).to(device=device, dtype=dtype, **layout).eval()
    fused = vnn.convert(copy.deepcopy(eager), conv2d=conv2d).eval()
    runs = [("eager", eager, False), ("vlfast", fused, False)]
    if compile_:
        runs += [("torch.compile", eager, True), ("vlfast+compile", fused, True)]

    variants, layers, by_type, by_op, reference = {}, {}, {}, {}, None
    for variant, module, compile_it in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        run = compiled(module) if compile_it else module
        say(f"{variant}: forward" + (" (compiling)" if compile_it else ""))
        with torch.no_grad():
            out = _first_tensor(run(*inputs)).float()
        reference = out if reference is None else reference
        entry = {"forward_us": bench(lambda: _forward(run, inputs), device).median,
                 "forward_backward_us": None,
                 "max_abs_diff": (out - reference).abs().max().item() if out.shape == reference.shape else None,
                 "peak_memory_mib": None}
        if not compile_it:
            say(f"{variant}: layer times ({iters} forwards)")
            layers[variant] = _layer_times(module, inputs, device, iters)
            by_type[variant] = _sum_by_type(layers[variant])
        if backward:
            say(f"{variant}: forward + backward" + (" (compiling)" if compile_it else ""))
            module.train()
            try:
                step = lambda: _train_step(module, run, inputs)  # noqa: E731
                entry["forward_backward_us"] = bench(step, device).median
                if not compile_it:
                    by_op[variant] = _op_times(step, device)
            finally:
                module.eval()
                module.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            entry["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        variants[variant] = entry

    info = machine(device)
    if not cuda and hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()[0]  # other processes on the cores make CPU times noisy
    return {
        "machine": info,
        "model": {"name": name or type(model).__name__, "class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")}
                             if isinstance(a, Tensor) else {"value": repr(a)} for a in inputs],
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "flops": sum(r["flops"] for r in layers["eager"])},
        "settings": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
                     "batch": inputs[0].shape[0] if inputs and isinstance(inputs[0], Tensor) else None,
                     "compile": compile_, "backward": backward, "conv2d": conv2d, "iters": iters},
        "limits": limits,
        "variants": variants,
        "layers": layers,
        "by_type": by_type,
        "by_op": by_op,
    }


def _to(a, device, dtype, channels_last: bool):
    if not isinstance(a, Tensor):
        return a
    a = a.to(device=device, dtype=dtype if a.is_floating_point() else a.dtype)
    return a.contiguous(memory_format=torch.channels_last) if channels_last and a.dim() == 4 else a


def _tensors(out) -> list[Tensor]:
    """The floating-point tensors of a model's output: a tensor, a tuple / list / dict of them, or ``.sample``."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "sample"):
        out = [out.sample]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _first_tensor(out) -> Tensor:
    found = _tensors(out)
    if not found:
        raise TypeError(f"the model returned no floating-point tensor ({type(out).__name__})")
    return found[0]


def _forward(run, inputs):
    with torch.no_grad():
        return run(*inputs)


def _train_step(module: nn.Module, run, inputs) -> None:
    module.zero_grad(set_to_none=True)
    sum(t.float().square().mean() for t in _tensors(run(*inputs))).backward()


# ---- per-layer times ----

@contextlib.contextmanager
def _global_hooks(pre, post):
    """``pre`` / ``post`` as torch's global forward (pre-)hooks of every module, removed on leaving."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    handles = [register_module_forward_pre_hook(pre)]
    try:
        handles.append(register_module_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def _layer_times(model: nn.Module, inputs, device, iters: int) -> list[dict]:
    """One row per module of ``model`` that ran (see the module docstring): self times are medians over
    ``iters`` forwards (robust to a busy machine), shares of their sum."""
    names = {id(m): name or "(model)" for name, m in model.named_modules()}
    modules = {id(m): m for m in model.modules()}
    cuda = device.type == "cuda"
    # One record per call: [module id, forward, parent record, start, end, input, output]; input / output
    # are (shape, elements, element size) of the first tensor. On CUDA start and end are events, read after
    # one synchronisation at the end.
    records, stack, it = [], [], 0

    def now():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pre(module, args):
        if id(module) in names:
            records.append([id(module), it, stack[-1] if stack else -1, None, None, _shape(args), None])
            stack.append(len(records) - 1)
            records[-1][3] = now()  # last: the hook's own work is outside the module's time

    def post(module, args, output):
        if id(module) in names:
            end = now()
            rec = records[stack.pop()]
            rec[4], rec[6] = end, _shape(output)

    with torch.no_grad(), _global_hooks(pre, post):
        for it in range(iters):
            model(*inputs)
    if cuda:
        torch.cuda.synchronize(device)

    inclusive = [r[3].elapsed_time(r[4]) * 1e3 if cuda else (r[4] - r[3]) * 1e6 for r in records]
    children = [0.0] * len(records)
    for i, r in enumerate(records):
        if r[2] >= 0:
            children[r[2]] += inclusive[i]
    agg: dict[int, dict] = {}
    for i, (key, n, _, _, _, inp, out) in enumerate(records):
        m = modules[key]
        row = agg.setdefault(key, {"name": names[key], "type": type(m).__name__,
                                   "vlfast": _is_vlfast(m),
                                   "shape": "x".join(map(str, out[0])) if out else "", "calls": 0,
                                   "self_us": [0.0] * iters, "flops": 0, "bytes": 0})
        row["calls"] += 1
        row["self_us"][n] += max(inclusive[i] - children[i], 0.0)
        flops, nbytes = _work(m, inp, out)
        row["flops"] += flops
        row["bytes"] += nbytes
    rows = list(agg.values())
    for r in rows:
        r["calls"] //= iters
        r["flops"] //= iters
        r["bytes"] //= iters
        r["self_us"] = us = statistics.median(r["self_us"])
        r["tflops"] = r["flops"] / us / 1e6 if r["flops"] and us > 0 else None
        r["gbps"] = r["bytes"] / us / 1e3 if r["bytes"] and us > 0 else None
    total = sum(r["self_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = 100 * r["self_us"] / total
    keys = ("name", "type", "vlfast", "shape", "calls", "self_us", "share", "flops", "bytes", "tflops", "gbps")
    return [{k: r[k] for k in keys} for r in sorted(rows, key=lambda r: -r["self_us"])]


def _is_vlfast(m: nn.Module) -> bool:
    """Whether ``m``'s class is one of vlfast's modules (vlfast.nn's drop-ins, the blocks convert swaps in)."""
    where = type(m).__module__
    return where.startswith("vlfast.") and not where.startswith("vlfast.models")


def _shape(value):
    """(shape, elements, element size) of the first tensor in ``value`` (args or output), or None."""
    if isinstance(value, Tensor):
        return tuple(value.shape), value.numel(), value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "sample"):
        value = [value.sample]
    if isinstance(value, (tuple, list)):
        for v in value:
            found = _shape(v)
            if found:
                return found
    return None


def _work(m: nn.Module, inp, out) -> tuple[int, int]:
    """(flops, bytes) of one call: a convolution's or linear layer's flops, any other leaf's bytes."""
    if inp is None or out is None:
        return 0, 0
    if isinstance(m, nn.ConvTranspose2d):
        return 2 * inp[1] * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1], 0
    if isinstance(m, nn.Conv2d):
        return 2 * out[1] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1], 0
    if isinstance(m, nn.Linear):
        return 2 * out[1] * m.in_features, 0
    if next(m.children(), None) is None:
        return 0, inp[1] * inp[2] + out[1] * out[2]
    return 0, 0


def _sum_by_type(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        out[r["type"]] += r["self_us"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _op_times(step, device, steps: int = 2) -> dict[str, float]:
    """Self time per op category of one ``step`` (forward + backward) under torch.profiler: the device
    time of the kernels each op launched on CUDA, the CPU time on a CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != DeviceType.CPU:  # kernels: counted through the op that launched them
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            out[_category(event.key)] += us / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _category(op: str) -> str:
    name = op.lower()
    for category, keys in OP_CATEGORIES:
        if any(k in name for k in keys):
            return category
    return "elementwise/other"


# ---- report ----

def _us(v) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _pct(v, limit) -> str:
    return f"{100 * v / limit:.0f}%" if v is not None and limit else "-"


def gpu_state(info: dict) -> str:
    """One line of a GPU's memory, utilisation, temperature and power draw from NVML ("" where unknown)."""
    parts = []
    if "memory_used_mib" in info:
        parts.append(f"memory {info['memory_used_mib']:.0f}/{info.get('memory_total_mib', 0):.0f} MiB")
    if "gpu_util_pct" in info:
        parts.append(f"utilisation {info['gpu_util_pct']}% (memory {info.get('mem_util_pct', '?')}%)")
    if "temperature_c" in info:
        parts.append(f"{info['temperature_c']} C")
    if "power_draw_w" in info:
        parts.append(f"{info['power_draw_w']:.0f}/{info.get('power_limit_w', 0):.0f} W")
    return ", ".join(parts)


def describe_inputs(inputs: list[dict]) -> str:
    """The ``model.inputs`` of a result as text: "1x3x32x32 float32, 1 int64"."""
    return ", ".join(f"{'x'.join(map(str, i['shape']))} {i['dtype']}" if "shape" in i else i["value"] for i in inputs)


def format_report(result: dict, top: int = 15) -> str:
    """The text report of :func:`profile_model`'s result: device, whole model, top layers, share by type."""
    lim, s, m = result["limits"], result["settings"], result["model"]
    out = [headline(result["machine"])]
    state = gpu_state(result["machine"])
    if state:
        out.append(f"GPU after the runs: {state}")
    load, cores = result["machine"].get("load_average"), os.cpu_count() or 1
    if load is not None and load > cores + 1:  # this run itself counts about 1
        out.append(f"note: load average {load:.1f} on {cores} cores: other processes share the CPU and the times "
                   "are noisy (OMP_NUM_THREADS=1 steadies them)")
    out.append(f"model {m['name']} ({m['parameters'] / 1e6:.3g}M parameters, "
               f"{m['flops'] / 1e9:.3g} GFLOP per forward), inputs {describe_inputs(m['inputs'])}, "
               f"in {s['dtype']}{', channels_last' if s['channels_last'] else ''}; convert(conv2d={s['conv2d']!r})")
    out.append(f"measured limits: copy {lim['copy_gbps']:.0f} GB/s (read + write)"
               + (f", bf16 matmul {lim['matmul_tflops']:.0f} TFLOP/s" if lim["matmul_tflops"] else ""))

    v = result["variants"]
    eager, comp = v["eager"], v.get("torch.compile")
    lines = []
    for name, e in v.items():
        f, fb = e["forward_us"], e["forward_backward_us"]
        lines.append([name, _us(f), f"{m['flops'] / f / 1e6:.3g}" if f else "-", _ratio(eager["forward_us"], f),
                      _ratio(comp["forward_us"], f) if comp else "-", _us(fb), _ratio(eager["forward_backward_us"], fb),
                      _ratio(comp["forward_backward_us"], fb) if comp else "-",
                      "-" if e["max_abs_diff"] is None else f"{e['max_abs_diff']:.2g}",
                      "-" if e["peak_memory_mib"] is None else f"{e['peak_memory_mib']:.0f}"])
    out += ["", "whole model (medians, us):",
            format_table(["variant", "forward", "TFLOP/s", "vs eager", "vs compile", "fwd+bwd", "vs eager",
                          "vs compile", "max |diff|", "peak MiB"], lines)]

    for name, rows in result["layers"].items():
        lines = [[r["name"], r["type"] + (" *" if r["vlfast"] else ""), r["shape"], str(r["calls"]), _us(r["self_us"]),
                  f"{r['share']:.1f}%", "-" if r["tflops"] is None else f"{r['tflops']:.3g}",
                  _pct(r["tflops"], lim["matmul_tflops"]), "-" if r["gbps"] is None else f"{r['gbps']:.3g}",
                  _pct(r["gbps"], lim["copy_gbps"])] for r in rows[:top]]
        out += ["", f"top {min(top, len(rows))} of {len(rows)} layers, {name} "
                    "(self time per forward; * a vlfast module):",
                format_table(["layer", "type", "output", "calls", "self us", "share", "TFLOP/s", "% matmul",
                              "GB/s", "% copy"], lines)]

    out += ["", "share of the forward by layer type (self time, us):", _compare(result["by_type"], "type")]
    if result["by_op"]:
        out += ["", "forward + backward by op category (torch.profiler self time, us):",
                _compare(result["by_op"], "op category")]
    return "\n".join(out)


def _compare(table: dict[str, dict[str, float]], what: str) -> str:
    """{variant: {key: us}} as one table: us and % per variant, and eager / vlfast where both are there."""
    variants = list(table)
    both = "eager" in table and "vlfast" in table
    totals = {var: sum(table[var].values()) or 1.0 for var in variants}
    lines = []
    for key in dict.fromkeys(k for var in variants for k in table[var]):
        line = [key]
        for var in variants:
            us = table[var].get(key)
            line += [_us(us), "-" if us is None else f"{100 * us / totals[var]:.1f}%"]
        lines.append(line + ([_ratio(table["eager"].get(key), table["vlfast"].get(key))] if both else []))
    lines.append(["total"] + [c for var in variants for c in (_us(totals[var]), "100%")]
                 + ([_ratio(totals["eager"], totals["vlfast"])] if both else []))
    headers = [what] + [h for var in variants for h in (var, "%")] + (["eager/vlfast"] if both else [])
    return format_table(headers, lines)


def plot(result: dict, path: str) -> None:
    """Draw :func:`profile_model`'s result (time by layer type, whole-model speed-ups) as a PNG at ``path``."""
    from .bench.plot import profile as draw
    s, m = result["settings"], result["model"]
    draw(result, path, f"{m['name']} on {result['machine'].get('name', s['device'])}: inputs "
                       f"{describe_inputs(m['inputs'])}, model in {s['dtype']}")
