"""PNG figures of ``python -m vlfast bench --plot`` and ``python -m vlfast profile --plot`` (matplotlib).

matplotlib is imported only when a figure is drawn, and drawn on a bare ``Figure`` (rendered by Agg):
pyplot's global state and the user's chosen backend are left alone.
"""

BLUE, ORANGE, GREEN, RED = "#4c72b0", "#dd8452", "#55a868", "#c44e52"


def _figure(width: float, height: float, ncols: int = 1, **kw):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"drawing a figure needs matplotlib: pip install matplotlib ({e})") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, **kw)


def bench(rows, path: str, title: str = "") -> None:
    """Horizontal bars of each vlfast row's speed-up over eager and over torch.compile (where timed), grouped
    by op and case, on a log axis with the 1x line. ``rows``: the Rows of ``vlfast.bench.run``."""
    base = {(r.op, r.case, r.provider): r.timing.median for r in rows if r.timing}
    bars = []  # (group, provider, over eager, over torch.compile or None)
    for r in rows:
        graph = r.provider.startswith("graph:")
        if r.timing is None or not r.provider.removeprefix("graph:").startswith("vlfast"):
            continue
        t = r.timing.median
        eager = base.get((r.op, r.case, "graph:eager" if graph else "eager"))
        comp = None if graph else base.get((r.op, r.case, "torch.compile"))
        if eager:
            bars.append((f"{r.op} {r.case}", r.provider, eager / t, comp / t if comp else None))
    if not bars:
        raise ValueError("nothing to plot: no vlfast row with an eager baseline")

    # y positions from the top, one slot per bar pair and a gap between groups.
    ys, y, prev = [], 0.0, None
    for group, *_ in bars:
        y += 1.6 if prev is not None and group != prev else 1.0
        ys.append(-y)
        prev = group
    fig, ax = _figure(10, 1.2 + 0.32 * y)
    h = 0.4  # over eager above, over torch.compile below
    ax.barh([v + h / 2 for v in ys], [b[2] for b in bars], height=h, color=BLUE, label="over eager")
    comp = [(v - h / 2, b[3]) for v, b in zip(ys, bars) if b[3] is not None]
    if comp:
        ax.barh([c[0] for c in comp], [c[1] for c in comp], height=h, color=ORANGE, label="over torch.compile")
    for v, b in zip(ys, bars):
        ax.text(b[2], v + h / 2, f" {b[2]:.2f}x", va="center", fontsize=7)
        if b[3] is not None:
            ax.text(b[3], v - h / 2, f" {b[3]:.2f}x", va="center", fontsize=7)
    ax.set_yticks(ys, [f"{g}: {p}" for g, p, *_ in bars], fontsize=7)
    _speedup_axis(ax, [b[2] for b in bars] + [c[1] for c in comp])
    ax.set_title(title or "vlfast speed-ups", fontsize=9)
    fig.savefig(path, dpi=120)


def profile(result: dict, path: str, title: str) -> None:
    """Self time per layer type, eager against vlfast (left), and each variant's whole-model speed-up over
    eager, forward and forward + backward (right), under ``title``. ``result``: ``vlfast.profile.profile_model``'s."""
    by_type = result["by_type"]
    names = list(by_type)
    types = sorted({t for v in names for t in by_type[v]}, key=lambda t: max(by_type[v].get(t, 0) for v in names))
    types = types[-14:]  # the slowest, drawn from the top
    fig, (left, right) = _figure(12, 1.8 + 0.3 * max(len(types), 4), ncols=2, width_ratios=[3, 2])
    h = 0.8 / max(len(names), 1)
    for i, (v, colour) in enumerate(zip(names, (BLUE, GREEN, ORANGE, RED))):
        left.barh([k + ((len(names) - 1) / 2 - i) * h for k in range(len(types))],  # the first variant on top
                  [by_type[v].get(t, 0) / 1e3 for t in types], height=h, color=colour, label=v)
    left.set_yticks(range(len(types)), types, fontsize=8)
    left.set_xlabel("self time per forward (ms)")
    left.legend(fontsize=8)
    left.set_title("forward time by layer type", fontsize=9)

    variants = result["variants"]
    eager = variants["eager"]
    bars = []  # (label, speed-up, colour)
    for v, e in variants.items():
        if v == "eager":
            continue
        bars.append((f"{v} forward", eager["forward_us"] / e["forward_us"], BLUE))
        if e["forward_backward_us"] and eager["forward_backward_us"]:
            bars.append((f"{v} fwd+bwd", eager["forward_backward_us"] / e["forward_backward_us"], ORANGE))
    bars.reverse()
    right.barh(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars], height=0.6)
    for k, b in enumerate(bars):
        right.text(b[1], k, f" {b[1]:.2f}x", va="center", fontsize=8)
    right.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    pad = max(0, 3 - len(bars)) / 2  # one or two bars keep a bar's height, centred
    right.set_ylim(-0.5 - pad, len(bars) - 0.5 + pad)
    _speedup_axis(right, [b[1] for b in bars] or [1.0], legend=False)
    right.set_xlabel("speed-up over eager")
    right.set_title("whole model", fontsize=9)

    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def _speedup_axis(ax, values, legend: bool = True) -> None:
    """A log x axis over ``values`` (speed-ups) and the 1x line, with plain tick labels."""
    from matplotlib.ticker import FuncFormatter
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(values) / 1.3), max(2.0, max(values) * 1.6))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    if legend:
        ax.legend(fontsize=8, loc="lower right")
