"""Tuning probes: vlfast's own kernels with a heuristic overridden, timed beside the providers a user compares.

A probe answers a tuning question (is the heuristic's choice faster than the path it rejected?), so
it is not part of ``python -m vlfast bench``. The benchmark scripts add the probes to their run with
``--probes`` (``benchmarks/gpu_check.sh`` passes it unless ``PROBES=0``)::

    python benchmarks/bench_group_norm.py --probes [--json out.json]
    python benchmarks/bench_conv_transpose.py --probes [--json out.json]

or from Python, with the repository root on ``sys.path``::

    from tools.probes import EXTRA
    vlfast.bench.run(device, ("group_norm",), extra=EXTRA)

Each entry of ``EXTRA`` is the ``extra`` factory of one op's ``vlfast.bench.<op>.cases``: given the case,
it returns {provider name: function}; the rows are timed forward only, on a GPU. The probes:

- ``vlfast-triton-split`` (GroupNorm): the Triton split path even where a group fits one program;
- ``vlfast-triton-v2`` (GroupNorm, channels_last): the one-group single-pass kernel, as before v3;
- ``vlfast-triton-phase`` (conv_transpose2d): the phase kernel where the sub-pixel kernel runs by
  default (v1 against v2).
"""

import torch

from vlfast.ops import _overrides

G = 32  # as vlfast.bench.group_norm


def forced_group_norm(pattern, **knobs):
    """The Triton GroupNorm forward of ``pattern`` ("ddpm" or "adm") planned under ``knobs`` of
    vlfast.ops._overrides (e.g. ``group_norm_single_max=0``: the split path). Planned at the first call and
    reused, as the op reuses its plans: a timed call only launches, like the vlfast rows beside it."""
    from vlfast.ops.group_norm_triton import plan_fwd
    plan = []

    def run(x, w, b, temb, scale, shift):
        add, scale, shift = (temb, None, None) if pattern == "ddpm" else (None, scale, shift)
        if not plan:
            with _overrides.use(**knobs):
                plan.append(plan_fwd(x, G, w, b, add, scale, shift, "silu"))
        return plan[0](x, w, b, 1e-5, add, scale, shift)[0]
    return run


def group_norm(*, pattern, device, channels_last, runnable, **_):
    """The GroupNorm probes of one case (see vlfast.bench.group_norm.cases)."""
    if device.type != "cuda" or "triton" not in runnable:
        return {}
    fns = {"vlfast-triton-split": forced_group_norm(pattern, group_norm_single_max=0)}
    if channels_last:
        fns["vlfast-triton-v2"] = forced_group_norm(pattern, group_norm_groups_per_program=0)
    return fns


def conv_transpose(*, geo, args, device, names, **_):
    """The conv_transpose2d probe of one case (see vlfast.bench.conv_transpose.cases)."""
    import functools

    from vlfast.ops.conv_transpose_triton import kernel_for
    k, s = geo[4], geo[5]
    if device.type != "cuda" or "vlfast-triton" not in names or k == s:
        return {}
    if kernel_for((k, k), (s, s), (1, 1)) != "subpixel":
        return {}
    return {"vlfast-triton-phase": functools.partial(_phase_probe, args=args, plan=[])}  # the kernel it replaced


def _phase_probe(x, w, b, args, plan: list):
    """The phase kernel forced on a geometry where the sub-pixel kernel runs by default (v1 against v2),
    planned once per case (``plan``: the case's list, empty until its first call), like the op's own calls."""
    from vlfast.ops._common import memory_format
    from vlfast.ops.conv_transpose import output_shape
    from vlfast.ops.conv_transpose_triton import plan_into
    shape = output_shape(x.shape, w.shape, (args["stride"],) * 2, (args["padding"],) * 2,
                         (args["output_padding"],) * 2, 1, (1, 1))
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if not plan:
        pair = lambda v: (v, v)  # noqa: E731
        with _overrides.use(conv_transpose_kernel="phase"):
            plan.append(plan_into(out, x, w, b, pair(args["stride"]), pair(args["padding"]),
                                  pair(args["output_padding"]), 1, (1, 1), 0))
    return plan[0](out, x, w, b)


# op -> the ``extra`` factory of vlfast.bench.run / vlfast.bench.<op>.cases
EXTRA = {"group_norm": group_norm, "conv_transpose": conv_transpose}
