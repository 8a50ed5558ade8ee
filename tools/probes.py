"""Tuning probes: vlfast's own kernels with a heuristic overridden, timed beside the providers a user compares.

A probe answers a tuning question (is the heuristic's choice faster than the path it rejected? which tiles
win here?), so it is not part of ``python -m vlfast bench``. The benchmark scripts add the probes to their
run with ``--probes`` (``benchmarks/gpu_check.sh`` passes it unless ``PROBES=0``)::

    python benchmarks/bench_group_norm.py --probes [--json out.json]
    python benchmarks/bench_conv_transpose.py --probes [--json out.json]
    python benchmarks/bench_conv2d.py --probes [--json out.json]

or from Python, with the repository root on ``sys.path``::

    from tools.probes import EXTRA
    vlfast.bench.run(device, ("group_norm",), extra=EXTRA)

Each entry of ``EXTRA`` is the ``extra`` factory of one op's ``vlfast.bench.<op>.cases``: given the case,
it returns {provider name: function}; the rows are timed forward only, on a GPU. Every probe calls the op
itself with a backend forced, under knobs of vlfast.ops._overrides: the op plans once per geometry and knobs
and reuses the plan, as it does for a user, and the benchmark records the knobs beside the key and backend
(``Timing.ran``), so that ``python -m vlfast tuning build`` keeps, at each measured key, the knobs a backend
won with (the per-card table then plans that backend with them). The probes:

- ``vlfast-triton-split`` (GroupNorm): the Triton split path even where a group fits one program;
- ``vlfast-triton-v2`` (GroupNorm, channels_last): the one-group single-pass kernel, as before v3;
- ``vlfast-triton-phase`` (conv_transpose2d): the phase kernel where the sub-pixel kernel runs by
  default (v1 against v2);
- ``vlfast-triton tiles MxNxK wW sS`` (conv2d, conv_transpose2d; bf16/fp16 channels_last, implicit-GEMM
  forward): the tiles of :data:`TILES` in place of the tile rule's. One compile per tile and case: only with
  ``VLFAST_TILE_PROBES=1`` (``TILES=1 bash benchmarks/gpu_check.sh``), a run of its own.
"""

import os

import torch

from vlfast.ops import _overrides

G = 32  # as vlfast.bench.group_norm


def forced_group_norm(pattern, **knobs):
    """The Triton GroupNorm forward of ``pattern`` ("ddpm" or "adm") under ``knobs`` of vlfast.ops._overrides
    (e.g. ``group_norm_single_max=0``: the split path)."""
    from vlfast.ops import group_norm as op

    def run(x, w, b, temb, scale, shift):
        add, scale, shift = (temb, None, None) if pattern == "ddpm" else (None, scale, shift)
        return op(x, G, w, b, add=add, scale=scale, shift=shift, activation="silu", backend="triton")
    return _under(knobs, run)


def group_norm(*, pattern, device, channels_last, runnable, **_):
    """The GroupNorm probes of one case (see vlfast.bench.group_norm.cases)."""
    if device.type != "cuda" or "triton" not in runnable:
        return {}
    fns = {"vlfast-triton-split": forced_group_norm(pattern, group_norm_single_max=0)}
    if channels_last:
        fns["vlfast-triton-v2"] = forced_group_norm(pattern, group_norm_groups_per_program=0)
    return fns


# Tile configs of the implicit-GEMM forward tried beside the rule's (knob igemm_tiles): each is one compile
# per case, so few: the rule's 128-row shape with fewer columns and more stages, a 64-row one with 128
# columns, and (for 256 columns and more) the wide tile.
TILES = [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
         dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)]


def tile_name(t: dict) -> str:
    return f"vlfast-triton tiles {t['BLOCK_M']}x{t['BLOCK_N']}x{t['BLOCK_K']} w{t['num_warps']} s{t['num_stages']}"


def _under(knobs: dict, fn):
    """``fn`` called under ``knobs``."""
    def run(*args, **kwargs):
        with _overrides.use(**knobs):
            return fn(*args, **kwargs)
    return run


def _tiles(cout: int, cin: int, dtype, channels_last: bool) -> list[dict]:
    """The tile probes for a GEMM of ``cout`` columns (per group) and ``cin`` input channels per group, where
    ``VLFAST_TILE_PROBES=1`` and the case is 16-bit channels_last."""
    if os.environ.get("VLFAST_TILE_PROBES") != "1" or dtype not in (torch.float16, torch.bfloat16) or not channels_last:
        return []
    # No tile wider than the GEMM: on the to-RGB up-conv (12 columns) every probe's tiles spilled when compiled
    # for sm_90 (`python tools/compile_check.py --tiles`), where the rule's 16 columns do not.
    return [t for t in TILES if t["BLOCK_N"] <= cout and (t["BLOCK_N"] < 256 or cin >= 256)]


def conv_transpose(*, geo, args, device, dtype, channels_last, names, **_):
    """The conv_transpose2d probes of one case (see vlfast.bench.conv_transpose.cases)."""
    from vlfast.ops import conv_transpose2d
    from vlfast.ops.conv_transpose_triton import kernel_for
    if device.type != "cuda" or "vlfast-triton" not in names:
        return {}
    base = lambda x, w, b: conv_transpose2d(x, w, b, **args, backend="triton")  # noqa: E731
    fns = {}
    k, s = geo[4], geo[5]
    if k != s and kernel_for((k, k), (s, s), (1, 1)) == "subpixel":
        fns["vlfast-triton-phase"] = _under({"conv_transpose_kernel": "phase"}, base)  # the kernel it replaced
    fns.update({tile_name(t): _under({"igemm_tiles": t}, base)
                for t in _tiles(geo[2] * s * s, geo[1], dtype, channels_last)})
    return fns


def conv2d(*, case, device, dtype, channels_last, fused, names, **_):
    """The conv2d tile probes of one case (see vlfast.bench.conv2d.cases): single layers only."""
    if device.type != "cuda" or "vlfast-triton" not in names or len(case.dilations) != 1:
        return {}
    return {tile_name(t): _under({"igemm_tiles": t}, fused("triton"))
            for t in _tiles(case.cout, case.cin, dtype, channels_last)}


# op -> the ``extra`` factory of vlfast.bench.run / vlfast.bench.<op>.cases
EXTRA = {"group_norm": group_norm, "conv_transpose": conv_transpose, "conv2d": conv2d}
