"""``auto`` by measurement: per-card tables of the backend that won each class of call, written by the benchmarks.

Every call of an op has a **tuning key**, a short path of coarse classes, most telling first::

    bfloat16/channels_last/dense/k3x3s1x1/d4/cin64/cout64/px2^18/plain     (a conv2d)
    bfloat16/nchw/n2^22/g2^14                                              (a group_norm)

the dtype, then what the op's :meth:`~vlfast.ops._dispatch.Op.tuning_fields` says of the inputs (layout,
kernel, channel and size classes; sizes as powers of 4; the layout by ``vlfast.ops._common.layout_class``).
A **table** belongs to one card (``"NVIDIA H200"``, or a CPU's model name) and maps, per op and
direction, keys to the backends fastest first, as the benchmarks measured them on that card (``python -m
vlfast bench --tuning FILE`` or ``python -m vlfast tuning build RESULTS.json... -o FILE``): the forward
from forward-only rows, the backward from forward + backward rows less the forward alone. Besides each
measured key it holds every shorter prefix of it (down to dtype and layout), ranked by the geometric mean of
each backend's time relative to the case's best over the measured keys under it: a call whose exact key was
not measured takes its longest prefix that was.

Which table a device uses, the first that applies:

1. ``VLFAST_TUNING=off``: none (``auto`` follows the ops' hand-written rules everywhere);
2. the table of ``VLFAST_TUNING=path/to/table.json`` where its card is the device's;
3. the package's table of the same card (``vlfast/tuning/<card>.json``);
4. on a GPU, a package table of another card of the same compute capability (an H100's on an H200);
5. none: the op's hand-written rule (:meth:`Op.rule`), which is also what a call gets where no prefix of its
   key is in the table.

A table changes the order ``auto`` tries the backends in (the measured ones first, then the others in the
op's rule's order), and at a measured key the knobs a backend won with
there (a kernel path, the implicit-GEMM tiles: the tuning probes' variants) with which eager calls plan it;
nothing else: a backend that cannot run a call is still skipped, forced backends are untouched (a forced
backend still plans with the table's knobs), and a table that cannot be read is ignored with a warning
(``auto`` never raises). :func:`decision` says what the table made of one call; ``python -m vlfast tuning
show`` prints the table a device uses.
"""

import contextlib
import functools
import json
import math
import os
import platform
import re
import threading
import warnings
from collections import defaultdict
from typing import Optional

import torch

from .. import backends

FORMAT = 1
# Every key keeps at least these many classes: the dtype and the layout (one table entry never speaks for
# another dtype or layout).
MIN_PREFIX = 2
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- keys
def _int(n) -> int:
    """A size as an int; under torch.compile with dynamic shapes the traced example's value (no guard is
    added: the table's choice, like every backend choice, is made once while tracing)."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else 1
    return int(n)


def size_class(n, prefix: str = "") -> str:
    """``n`` to the nearest power of 4 (in log scale), written as a power of 2: 300 -> "2^8", 3000 -> "2^12"."""
    e = 2 * math.floor(math.log2(max(_int(n), 1)) / 2 + 0.5)  # halfway (2, 8, 32...) rounds up
    return f"{prefix}2^{e}"


def channel_class(c, prefix: str) -> str:
    """A channel count to the power of 2 at or above it: 96 -> "cin128"."""
    return f"{prefix}{1 << max(_int(c) - 1, 0).bit_length()}"


def key(op: str, inputs) -> str:
    """The tuning key of one call of ``op`` (what its checks made of the arguments)."""
    fields = backends.OPS[op].tuning_fields(inputs)
    return "/".join((str(inputs.dtype).removeprefix("torch."), *fields))


# ---------------------------------------------------------------- cards
def slug(card: str) -> str:
    """The file name of a card's table: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def card(device_type: str, index: Optional[int] = None) -> tuple[str, Optional[str]]:
    """(name, compute capability "9.0" or None) of a device: the GPU's, or the CPU's model name."""
    if device_type == "cuda":
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"{major}.{minor}"
    return cpu_name(), None


# ---------------------------------------------------------------- tables
class Table:
    """One card's measured orders (the JSON of :func:`build`): ``entries[op][direction][key]`` is
    ``{"order": [...], "rel": {backend: geometric-mean time / best}, "cases": n}``, and at a measured key
    where a backend won with private knobs (``vlfast.ops._overrides.PLAN_KNOBS``: a kernel path, tiles),
    ``"knobs": {backend: {knob: value}}``."""

    def __init__(self, data: dict, source: str = ""):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a vlfast tuning table of format {FORMAT}")
        for field in ("card", "device_type", "entries"):
            if field not in data:
                raise ValueError(f"the table has no {field!r}")
        for op, directions in data["entries"].items():
            for direction, entries in directions.items():
                for k, e in entries.items():
                    order = e.get("order") if isinstance(e, dict) else None
                    if not order or any(b not in backends.BACKENDS for b in order):
                        raise ValueError(f"{op} {direction} {k}: order must name vlfast backends, got {order!r}")
                    _check_knobs(e.get("knobs", {}), f"{op} {direction} {k}")
        self.data, self.source = data, source
        self.card, self.device_type = data["card"], data["device_type"]
        self.capability = data.get("capability")

    @classmethod
    def load(cls, path: str) -> "Table":
        with open(path) as f:
            return cls(json.load(f), source=path)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
            f.write("\n")

    def match(self, op: str, direction: str, call_key: str) -> Optional[tuple[str, dict]]:
        """(the longest prefix of ``call_key`` in the table, its entry), or None."""
        entries = self.data["entries"].get(op, {}).get(direction, {})
        parts = call_key.split("/")
        for n in range(len(parts), MIN_PREFIX - 1, -1):
            e = entries.get("/".join(parts[:n]))
            if e is not None:
                return "/".join(parts[:n]), e
        return None


def _check_knobs(knobs, where: str) -> None:
    from ..ops import _overrides
    if not isinstance(knobs, dict):
        raise ValueError(f"{where}: knobs must be {{backend: {{knob: value}}}}, got {knobs!r}")
    for backend, values in knobs.items():
        if backend not in backends.BACKENDS or not isinstance(values, dict):
            raise ValueError(f"{where}: knobs must be {{backend: {{knob: value}}}}, got {knobs!r}")
        bad = set(values) - set(_overrides.PLAN_KNOBS)
        if bad:
            raise ValueError(f"{where}: {sorted(bad)} are not knobs a plan reads ({_overrides.PLAN_KNOBS})")
        if "igemm_tiles" in values:
            _overrides.check_tiles(values["igemm_tiles"])


def package_tables() -> list[str]:
    """The tables shipped in the package."""
    return sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".json"))


_forced: list = []  # use_table's stack (tests, experiments): the innermost wins for every device
_lock = threading.Lock()


@functools.cache
def _environment() -> str:
    return os.environ.get("VLFAST_TUNING", "")


@functools.cache
def _load(path: str) -> Optional[Table]:
    try:
        return Table.load(path)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"vlfast: ignoring the tuning table {path}: {e}", stacklevel=2)
        return None


@functools.cache
def _table_for(device_type: str, index: Optional[int]) -> tuple[Optional[Table], str]:
    """(the table a device uses, why) by the module docstring's rule."""
    env = _environment()
    if env == "off":
        return None, "VLFAST_TUNING=off"
    try:
        name, capability = card(device_type, index)
    except Exception as e:  # noqa: BLE001 - no such device here: the hand-written rules
        return None, f"device unknown ({type(e).__name__})"
    tables = [t for t in ([_load(env)] if env else []) + [_load(p) for p in package_tables()] if t is not None]
    for t in tables:
        if t.device_type == device_type and t.card == name:
            return t, f"measured on this card ({t.card})"
    if device_type == "cuda":
        for t in tables:
            if t.device_type == "cuda" and t.capability == capability:
                return t, f"measured on {t.card}, the same compute capability ({capability})"
    return None, f"no table for {name}"


def table_for(device: torch.device) -> tuple[Optional[Table], str]:
    """(the table ``device`` uses or None, why)."""
    if _forced:
        return _forced[-1], "use_table"
    device = torch.device(device)
    return _table_for(device.type, device.index)


def lookup(op: str, direction: str, call_key: str, device: torch.device) -> Optional[tuple[str, ...]]:
    """The measured order for one call (its key) on ``device``, or None (the op's rule decides)."""
    found = _lookup(op, direction, call_key, device.type, device.index)
    return tuple(found.split(",")) if found else None


@torch.compiler.assume_constant_result
def _lookup(op: str, direction: str, call_key: str, device_type: str, index: Optional[int]) -> str:
    """:func:`lookup` as a constant for torch.compile (plain values in, a string out: "" for none, else the
    order joined by commas): Dynamo does not trace the table's loading."""
    table, _ = table_for(torch.device(device_type, index) if index is not None else torch.device(device_type))
    if table is None or table.device_type != device_type:
        return ""
    found = table.match(op, direction, call_key)
    return ",".join(found[1]["order"]) if found else ""


def knobs(op: str, direction: str, call_key: str, device: torch.device, backend: str) -> dict:
    """The knobs the table gives ``backend`` at exactly this key on ``device`` (measured with them there),
    else {}: the eager planning of the op applies them (compiled code plans by the kernels' own rules)."""
    table, _ = table_for(device)
    if table is None or table.device_type != device.type:
        return {}
    e = table.data["entries"].get(op, {}).get(direction, {}).get(call_key)
    return dict(e.get("knobs", {}).get(backend, {})) if e else {}


def decision(op: str, inputs, direction: str = "forward") -> dict:
    """What the tables make of one call: its key, the table and why, the prefix matched, the order (None:
    the op's rule: then ``rule`` is the rule's order, None meaning the device's default)."""
    decl, call_key = backends.OPS[op], key(op, inputs)
    table, why = table_for(inputs.device)
    found = table.match(op, direction, call_key) if table is not None else None
    return {"key": call_key, "table": table.source if table else None, "why": why,
            "matched": found[0] if found else None, "order": tuple(found[1]["order"]) if found else None,
            "rule": None if found else decl.rule(direction, inputs),
            "knobs": found[1].get("knobs", {}) if found and found[0] == call_key else {}}


def _clear_plans() -> None:
    for decl in backends.OPS.values():
        decl.plans.clear()


@contextlib.contextmanager
def use_table(table):
    """Use ``table`` (a :class:`Table`, a dict in its format or a path) for the devices of its type inside
    the block, whatever the card; None: no table. Process-wide, not per thread; the ops' cached plans are
    dropped on entering and leaving (a plan made under one table must not serve another). Under
    ``torch.compile`` the choice is made while tracing: enter the block before compiling."""
    if isinstance(table, str):
        table = Table.load(table)
    elif isinstance(table, dict):
        table = Table(table)
    with _lock:
        _forced.append(table)
    _clear_plans()
    try:
        yield table
    finally:
        with _lock:
            _forced.pop()
        _clear_plans()


# ---------------------------------------------------------------- recording what ran
class Recorder:
    """What the ops ran inside :func:`recording`: each plan's report (backends and key) and how many calls."""

    def __init__(self):
        self.counts: dict[int, list] = {}

    def add(self, report: dict) -> None:
        hit = self.counts.get(id(report))
        if hit is None:
            self.counts[id(report)] = [report, 1]
        else:
            hit[1] += 1

    def summary(self) -> dict:
        """{"op direction": {"key", "backend", "share"[, "knobs"]}}: per op and direction the commonest (key,
        backend, plan knobs) of the calls and its share of them (1.0 where every call was the same)."""
        tally: dict = defaultdict(lambda: defaultdict(int))
        for report, n in self.counts.values():
            call_key = next((v for (o, d), v in report.items() if d == "key"), None)
            knobs = next((v for (o, d), v in report.items() if d == "knobs"), {})
            frozen = json.dumps(knobs, sort_keys=True)
            for (o, d), backend in report.items():
                if d in ("forward", "backward"):
                    tally[f"{o} {d}"][(call_key, backend, frozen if d == "forward" else "{}")] += n
        out = {}
        for name, pairs in tally.items():
            (k, b, frozen), n = max(pairs.items(), key=lambda kv: kv[1])
            out[name] = {"key": k, "backend": b, "share": round(n / sum(pairs.values()), 3)}
            if frozen != "{}":
                out[name]["knobs"] = json.loads(frozen)
        return out


@contextlib.contextmanager
def recording():
    """Record what every vlfast op call inside the block ran (the benchmarks tag their rows with it)."""
    rec = Recorder()
    backends.recorders.append(rec)
    try:
        yield rec
    finally:
        backends.recorders.remove(rec)


# ---------------------------------------------------------------- building a table from benchmark rows


def _single_op_rows(providers: dict) -> dict:
    """{provider: (op, forward, backward or None, us)} of a case's vlfast rows that ran one op at one key
    (``forward``/``backward``: the ``ran`` summaries); not auto's rows, which repeat a backend timed alone."""
    out = {}
    for name, r in providers.items():
        if not name.startswith("vlfast-") or name == "vlfast-auto":
            continue
        ran = r["timing"].get("ran") or {}
        if len(ran) == 0 or any(v["share"] < 0.9 or v["key"] is None for v in ran.values()):
            continue  # not one op at one key: a composite case (a chain of layers, a whole model)
        ops = {n.split()[0] for n in ran}
        if len(ops) != 1 or next(iter(ops)) not in backends.OPS:  # one op, and one this vlfast declares
            continue
        op = ops.pop()
        fwd, bwd = ran.get(f"{op} forward"), ran.get(f"{op} backward")
        if fwd is not None and (bwd is None or bwd["key"] == fwd["key"]):
            out[name] = (op, fwd, bwd, r["timing"]["median"])
    return out


def _measurements(rows: list[dict]) -> dict:
    """{(op, direction, key): [{backend: (us, knobs)} per case]} from benchmark rows (dicts, as in the JSON).

    Forward: the rows of forward-only cases, each backend's fastest variant (its rows under different
    knobs: the tuning probes) with the knobs it ran with. Backward: a forward + backward row's time less
    that of the same provider's row in the forward-only case of the same name (the bench op's "fwd+bwd"
    and "fwd"), where both ran the same forward. The eager rows stand for the reference backend of the ops
    whose declaration says ``eager_is_reference`` (its backward: autograd through the same aten calls)."""
    by_case: dict = defaultdict(dict)
    for r in rows:
        if r.get("timing") is not None and not r["provider"].startswith("graph:"):
            by_case[(r["op"], r["case"], r["dtype"])][r["provider"]] = r
    tagged = {case: _single_op_rows(providers) for case, providers in by_case.items()}
    found: dict = defaultdict(list)
    for case, rows_ in tagged.items():
        if not rows_ or len({(op, fwd["key"]) for op, fwd, _, _ in rows_.values()}) != 1:
            continue
        op, k = next((op, fwd["key"]) for op, fwd, _, _ in rows_.values())
        eager = by_case[case].get("eager")
        times: dict = {}
        if all(bwd is None for _, _, bwd, _ in rows_.values()):
            for _, fwd, _, us in sorted(rows_.values(), key=lambda v: v[-1], reverse=True):
                times[fwd["backend"]] = (us, fwd.get("knobs", {}))  # each backend's fastest variant
            if backends.OPS[op].eager_is_reference and eager is not None and "reference" not in times:
                times["reference"] = (eager["timing"]["median"], {})
            found[(op, "forward", k)].append(times)
            continue
        if not case[0].endswith("fwd+bwd"):
            continue
        alone_case = (case[0].removesuffix("fwd+bwd") + "fwd",) + case[1:]
        alone = tagged.get(alone_case, {})
        for name, (_, fwd, bwd, us) in rows_.items():
            base = alone.get(name)
            if bwd is None or base is None or (base[1]["key"], base[1]["backend"]) != (k, fwd["backend"]):
                continue
            if us - base[3] > 0 and (bwd["backend"] not in times or us - base[3] < times[bwd["backend"]][0]):
                times[bwd["backend"]] = (us - base[3], {})
        eager_alone = by_case.get(alone_case, {}).get("eager")
        if (backends.OPS[op].eager_is_reference and eager is not None and eager_alone is not None
                and "reference" not in times):
            if eager["timing"]["median"] > eager_alone["timing"]["median"]:
                times["reference"] = (eager["timing"]["median"] - eager_alone["timing"]["median"], {})
        if times:
            found[(op, "backward", k)].append(times)
    return found


def build(rows: list[dict], machine: dict) -> Table:
    """A table from benchmark rows (dicts: a bench JSON's ``rows``) measured on ``machine`` (its
    ``machine``): every measured key and every prefix of one, each ranked by the geometric mean over its
    cases of each backend's time relative to the case's fastest. Backends measured in only some cases
    under a prefix are ranked after the others by the same mean over their cases. A prefix that orders
    the backends as its parent prefix does is left out (its calls find the parent: the same order).
    Backward entries come from the forward + backward rows less the forward alone (:func:`_measurements`)."""
    grouped: dict = defaultdict(list)  # (op, direction, prefix) -> [case times]
    measured = _measurements(rows)
    for (op, direction, k), cases in measured.items():
        parts = k.split("/")
        for n in range(len(parts), MIN_PREFIX - 1, -1):
            grouped[(op, direction, "/".join(parts[:n]))] += cases
    entries: dict = defaultdict(lambda: defaultdict(dict))
    orders: dict = {}  # every prefix's order, those left out included
    for (op, direction, prefix), cases in sorted(grouped.items(), key=lambda kv: kv[0][2].count("/")):
        parent = orders.get((op, direction, prefix.rsplit("/", 1)[0])) if prefix.count("/") >= MIN_PREFIX else None
        logs: dict = defaultdict(list)
        for times in cases:
            best = min(t for t, _ in times.values())
            for b, (t, _) in times.items():
                logs[b].append(math.log(t / best) if best > 0 else 0.0)
        rel = {b: math.exp(sum(v) / len(v)) for b, v in logs.items()}
        everywhere = [b for b in rel if len(logs[b]) == len(cases)]
        order = sorted(everywhere, key=rel.get) + sorted((b for b in rel if b not in everywhere), key=rel.get)
        orders[(op, direction, prefix)] = order
        if parent == order and (op, direction, prefix) not in measured:
            continue  # a prefix that orders as its parent does: the lookup falls back to the parent alike
        entry = {"order": order, "rel": {b: round(rel[b], 4) for b in order}, "cases": len(cases)}
        if (op, direction, prefix) in measured:  # knobs at measured keys, where every case won with them
            knobs = {b: kn for b, (_, kn) in cases[0].items()
                     if kn and all(c.get(b, (0, None))[1] == kn for c in cases)}
            if knobs:
                entry["knobs"] = knobs
        entries[op][direction][prefix] = entry
    device_type = "cuda" if machine.get("device") == "cuda" else "cpu"
    capability = machine.get("capability")
    data = {"format": FORMAT, "card": machine.get("name", "unknown"), "device_type": device_type,
            "capability": capability,
            "measured": {k: machine.get(k) for k in ("date", "torch", "triton", "cuda", "git_sha", "driver")
                         if machine.get(k) is not None},
            "entries": {op: dict(d) for op, d in entries.items()}}
    return Table(data)


def build_from_files(paths: list[str]) -> Table:
    """One table from benchmark JSON files (``python -m vlfast bench --json``) of one card; other JSON files
    among them (a tuning table, a profile: no ``machine`` and ``rows``) are passed over with a warning."""
    rows, machine = [], None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "machine" not in data:
            warnings.warn(f"{path} is not a benchmark's JSON (no machine and rows): passed over", stacklevel=2)
            continue
        m = data["machine"]
        if machine is not None and m.get("name") != machine.get("name"):
            raise ValueError(f"{path} was measured on {m.get('name')!r}, the others on {machine.get('name')!r}")
        machine = machine or m
        rows += data.get("rows", [])
    if machine is None:
        raise ValueError("no benchmark JSON among the files given")
    return build(rows, machine)


def describe(table: Optional[Table], why: str = "") -> str:
    """The table as text: its card, when and with what it was measured, and each op's measured keys."""
    if table is None:
        return f"no tuning table ({why}): auto follows each op's hand-written rule"
    m = table.data.get("measured", {})
    lines = [f"tuning table of {table.card} ({table.device_type}"
             + (f", capability {table.capability}" if table.capability else "") + f"): {why}",
             "measured " + ", ".join(f"{k} {v}" for k, v in m.items())]
    for op, directions in sorted(table.data["entries"].items()):
        for direction, entries in sorted(directions.items()):
            lines.append(f"{op} {direction}: {len(entries)} keys")
            width = max(len(k) for k in entries)
            for k, e in sorted(entries.items()):
                rel = " ".join(f"{b} {e['rel'][b]:.2f}" for b in e["order"] if b in e.get("rel", {}))
                knobs = "".join(f"; {b} with {json.dumps(kn, sort_keys=True)}" for b, kn in e.get("knobs", {}).items())
                lines.append(f"  {k.ljust(width)}  {' > '.join(e['order'])}   "
                             f"({e.get('cases', '?')} cases; {rel}{knobs})")
    return "\n".join(lines)
