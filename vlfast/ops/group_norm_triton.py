"""Triton launchers of the fused GroupNorm (kernels: vlfast/kernels/group_norm.py; spec:
vlfast/reference/group_norm.py). The custom op, its autograd and the module live in
vlfast/ops/group_norm.py; these two functions are its Triton backend.

Paths, chosen from the shape (tests, probes and tools force them with the private knobs of
:mod:`vlfast.ops._overrides`: ``group_norm_single_max``, ``group_norm_split_tile``,
``group_norm_split_programs``, ``group_norm_groups_per_program``):

- single pass, when the group padded to powers of two (C/G channels x S positions) holds at most
  ``single_pass_max(dtype)`` elements and there are enough (sample, group) programs: one kernel that
  reads x once (backward: one kernel reading x and dy once, plus a tiny dweight/dbias reduction);
  the forward on channels-contiguous inputs gives each program several groups of a sample
  (:func:`default_groups_per_program`, or forced with ``group_norm_groups_per_program``);
- split otherwise: stats -> finalize -> apply (backward: partial sums -> group terms -> dx -> dweight/dbias).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from . import _overrides
from ..activations import code as activation_code
from ..backends import KERNEL_DTYPES
from ._common import cdiv, num_sms, pow2, shares_memory, suggest_memory_format

# Largest group, padded to powers of two (elements), that one program holds in registers (forward).
SINGLE_PASS_MAX = {torch.float32: 16384, torch.float16: 32768, torch.bfloat16: 32768}
# A group this large with fewer than 2 * SMs (sample, group) programs takes the split path.
SPLIT_MIN_GROUP = 4096
# Channels_last single pass: one program widens to several groups until a position's run of channels
# spans this many bytes (a 128-byte line: four 32-byte sectors), within the register budget.
GPP_TARGET_BYTES = 128
SPLIT_TILE = 4096       # elements of one tile of the split kernels
MAX_CHUNKS = 256        # spatial chunks per (sample, channel) of the split reductions


def _warps(elements: int, most: int = 16) -> int:
    return max(1, min(most, elements // 256))


def single_pass_max(dtype: torch.dtype, backward: bool = False) -> int:
    """Padded group size up to which the single-pass kernel runs (backward holds x and dy: half)."""
    return SINGLE_PASS_MAX[dtype] // (2 if backward else 1)


def _check(x: Tensor, num_groups: int, activation) -> tuple[int, int, int, int]:
    """(N, C, G, S) after the checks the kernels rely on."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton group_norm takes {KERNEL_DTYPES}, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"input must be (N, C, *), got shape {tuple(x.shape)}")
    activation_code(activation)  # ValueError for an unknown one
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {c} channels")
    s = math.prod(x.shape[2:])
    if c * s >= 2**31:
        raise ValueError(f"one sample has {c * s} elements; the kernels index a sample with int32")
    return n, c, num_groups, s


def _params(weight, bias, add, scale, shift, n: int, c: int, x: Tensor):
    """Kernel flags, the five per-channel operands ready to pass, and the row strides of add/scale/shift."""
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None)
    add, stride_an = _rows(add, "add", n, c, x)
    scale, stride_scn = _rows(scale, "scale", n, c, x)
    shift, stride_shn = _rows(shift, "shift", n, c, x)
    return flags, (_vec(weight, "weight", c, x), _vec(bias, "bias", c, x), add, scale, shift), \
        (stride_an, stride_scn, stride_shn)


def _strides_ncs(x: Tensor) -> Optional[tuple[int, int, int]]:
    """(stride_n, stride_c, stride_s) when the spatial dims flatten to one stride, else None."""
    spatial = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:]) if size != 1]
    stride_s = spatial[-1][1] if spatial else 1
    expect = stride_s
    for size, stride in reversed(spatial):
        if stride != expect:
            return None
        expect *= size
    return x.stride(0), x.stride(1), stride_s


def _dense(x: Tensor) -> bool:
    """NCHW, channels_last, channels_last_3d or (N, C, L) with any C stride: layouts the kernels index."""
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
            or (x.dim() == 3 and x.transpose(1, 2).is_contiguous()))


def _view_ncs(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x (copied to contiguous only when its spatial dims don't flatten or it isn't dense) and its strides.

    NCHW, channels_last, channels_last_3d and (N, C, L) with any C stride run as they are.
    """
    strides = _strides_ncs(x)
    if strides is None or not _dense(x):
        x = x.contiguous()
        strides = _strides_ncs(x)
    return x, strides


def _rows(t: Optional[Tensor], name: str, n: int, c: int, dummy: Tensor) -> tuple[Tensor, int]:
    """A per-(sample, channel) tensor with unit channel stride, and its row stride; (dummy, 0) when absent."""
    if t is None:
        return dummy, 0
    if tuple(t.shape) != (n, c):
        raise ValueError(f"{name} must have shape ({n}, {c}), got {tuple(t.shape)}")
    if c > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def _vec(t: Optional[Tensor], name: str, c: int, dummy: Tensor) -> Tensor:
    if t is None:
        return dummy
    if tuple(t.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
    return t.contiguous()


def takes_split_path(x: Tensor, num_groups: int) -> bool:
    """Whether the forward of this input runs the split path (three launches) rather than the single pass."""
    n, c = x.shape[:2]
    return not _use_single(n, num_groups, c // num_groups, math.prod(x.shape[2:]), x.dtype, False,
                           _overrides.get("group_norm_single_max"), x.device)


def _use_single(n: int, g: int, cpg: int, s: int, dtype, backward: bool, single_max: Optional[int],
                device: torch.device) -> bool:
    padded = pow2(cpg) * pow2(s)
    if single_max is not None:
        return padded <= single_max
    if padded > single_pass_max(dtype, backward):
        return False
    return not (n * g < 2 * num_sms(device) and cpg * s >= SPLIT_MIN_GROUP)


def default_groups_per_program(n: int, c: int, g: int, s: int, dtype: torch.dtype, stride_c: int,
                               device: torch.device) -> int:
    """Which single-pass forward kernel runs, as the ``groups_per_program`` that :func:`group_norm_fwd` picks:
    0 for the one-group kernel (spatial positions contiguous: NCHW), k >= 1 for the channel-run kernel
    with k consecutive groups of one sample per program (channels contiguous: channels_last).

    With contiguous channels the channels of one group at one position are a run of only
    C/G * element_size bytes (8 for 4 bf16 channels), and a program reading them alone leaves most of
    each 32-byte sector it touches unused. So: the smallest power of two GPP dividing G whose run of
    GPP * C/G channels reaches GPP_TARGET_BYTES, doubling only while GPP groups padded to powers of two
    still fit ``single_pass_max(dtype)`` and the N*G/GPP programs stay >= 2 * SMs (the last waived for
    shapes with fewer programs than that to begin with: small, launch-bound ones). Even GPP = 1 runs
    the channel-run kernel there: its C/G is a compile-time constant, so a power-of-two run loads as
    whole vectors (compiled for sm_90, 16x256x64x64 bf16: 16-byte loads and no spills, where the
    one-group kernel issued 2-byte loads and spilled).
    """
    if stride_c != 1 or c == 0:
        return 0
    cpg = c // g
    run, padded = cpg * dtype.itemsize, pow2(cpg) * pow2(s)
    enough = 2 * num_sms(device)
    gpp = 1
    while (g % (2 * gpp) == 0 and 2 * gpp * padded <= single_pass_max(dtype) and gpp * run < GPP_TARGET_BYTES
           and (n * g // (2 * gpp) >= enough or n * g < enough)):
        gpp *= 2
    return gpp


def _split_config(n: int, c: int, cpg: int, s: int, stride_c: int, tile: Optional[int],
                  programs: Optional[int], device: torch.device) -> dict:
    """Tiles of the split kernels: channel-major tiles when channels are contiguous, else spatial-major;
    spatial chunks of the reductions sized for about ``programs`` programs (default 8 per SM)."""
    tile = tile or SPLIT_TILE
    if stride_c == 1 and c > 1 and s > 1:
        block_c = min(pow2(c), 128, tile)
        block_s = min(pow2(s), max(1, tile // block_c))
    else:
        block_s = min(pow2(s), tile)
        block_c = min(pow2(c), max(1, tile // block_s))
    n_cb, n_sb = cdiv(c, block_c), cdiv(s, block_s)
    programs = programs or 8 * num_sms(device)
    per_chunk = max(1, min(n_sb, n * n_cb * n_sb // programs), cdiv(n_sb, MAX_CHUNKS))
    s_chunk = per_chunk * block_s
    chunks = cdiv(s, s_chunk)
    block_p = pow2(chunks)
    return dict(BLOCK_C=block_c, BLOCK_S=block_s, n_cb=n_cb, n_sb=n_sb, S_CHUNK=s_chunk, P=chunks,
                BLOCK_P=block_p, BLOCK_CG=min(pow2(cpg), max(1, min(tile, 2048) // block_p)),
                warps=_warps(block_c * block_s, 8))


def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None, activation: Optional[str] = None,
                   out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused GroupNorm forward; returns ``(out, mean, rstd)``, ``out`` written where given (see :func:`plan_fwd`).

    x: (N, C, *) float32/float16/bfloat16, NCHW-contiguous, channels_last(_3d) or (N, C, L) with unit
    channel stride (other layouts are copied to contiguous); weight, bias: (C,); add, scale, shift:
    (N, C) with unit channel stride (else copied); any float dtypes. out has x's dtype, and the layout
    and strides of F.group_norm's output (x's strides for (N, C, L) with unit channel stride); mean,
    rstd: (N, G) float32. The knobs of :mod:`vlfast.ops._overrides` override the heuristics (tests,
    probes): ``group_norm_single_max`` (padded group elements; 0 forces the split path),
    ``group_norm_split_tile``, ``group_norm_split_programs`` and ``group_norm_groups_per_program``
    (the single-pass kernel: 0 the one-group kernel, k >= 1 the channel-run kernel with k groups a
    program, a power of two dividing G; any layout). Equivalent::

        h = x + add[:, :, None, None]
        out = act(F.group_norm(h, G, weight, bias, eps) * (1 + scale[..., None, None]) + shift[..., None, None])
    """
    run = plan_fwd(x, num_groups, weight, bias, add, scale, shift, activation)
    return run(x, weight, bias, eps, add, scale, shift, out)


def plan_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
             add: Optional[Tensor] = None, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
             activation: Optional[str] = None):
    """Everything :func:`group_norm_fwd` works out from the tensors' metadata (checks, layout, path, tiles,
    kernel arguments), as ``run(x, weight, bias, eps, add, scale, shift, out=None) -> (out, mean, rstd)``,
    which only allocates and launches. ``run`` is valid for any tensors with the same shapes, strides, dtypes
    and device as these: the op caches it per geometry, since working it out again costs more host time than
    the kernel takes at small shapes. It is planned under the knobs of :mod:`vlfast.ops._overrides` set
    when it is made. ``out`` (x's shape and dtype, any strides): written and returned; the kernels write it
    directly where it has the strides of the output they would allocate and shares no memory with the
    inputs, else a fresh output is copied into it.
    """
    return _into(_plan_fwd(x, num_groups, weight, bias, add, scale, shift, activation),
                 torch.empty_like(x, device="meta", memory_format=_out_format(x)).stride())


def _out_format(x: Tensor) -> torch.memory_format:
    """The memory format of the forward's output for x (F.group_norm's; x's own strides where x is in neither)."""
    fmt = suggest_memory_format(x)
    return fmt if x.is_contiguous(memory_format=fmt) else torch.preserve_format


def _into(run, strides: tuple):
    """``run`` of :func:`_plan_fwd` with its ``out`` as :func:`plan_fwd` describes it."""
    def run_into(x, weight, bias, eps, add, scale, shift, out=None):
        if out is None or (out.stride() == strides and not any(
                shares_memory(out, t) for t in (x, weight, bias, add, scale, shift))):
            return run(x, weight, bias, eps, add, scale, shift, out)
        y, mean, rstd = run(x, weight, bias, eps, add, scale, shift)
        return out.copy_(y), mean, rstd
    return run_into


def _plan_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor],
              scale: Optional[Tensor], shift: Optional[Tensor], activation: Optional[str]):
    """:func:`plan_fwd`, whose ``run`` takes an ``out`` only where the kernels can write it."""
    from vlfast.kernels.group_norm import (group_norm_apply_kernel, group_norm_finalize_kernel,
                                           group_norm_fwd_fused_groups_kernel, group_norm_fwd_fused_kernel,
                                           group_norm_stats_kernel)

    n, c, g, s = _check(x, num_groups, activation)
    single_max = _overrides.get("group_norm_single_max")
    gpp = _overrides.get("group_norm_groups_per_program")
    if gpp is not None and gpp != 0 and (gpp < 0 or gpp & (gpp - 1) or g % gpp):
        raise ValueError(f"group_norm_groups_per_program={gpp} must be 0 or a power of two dividing "
                         f"num_groups={g}")
    flags, _, (stride_an, stride_scn, stride_shn) = _params(weight, bias, add, scale, shift, n, c, x)
    copy_rows = tuple(t is not None and c > 1 and t.stride(1) != 1 for t in (add, scale, shift))
    x_strides = _strides_ncs(x)
    fmt = suggest_memory_format(x)
    if x_strides is None or not _dense(x) or torch.empty_like(x).stride() != x.stride():
        # A layout the kernels don't index: run on a copy, in the layout F.group_norm would give its output.
        inner = _plan_fwd(x.contiguous(memory_format=fmt), num_groups, weight, bias, add, scale, shift, activation)
        return lambda x, *rest: inner(x.contiguous(memory_format=fmt), *rest)
    # out in F.group_norm's layout: fmt's own strides, which differ from a dense x's only at size-1 dims
    # (so the kernels index both with x's); x's strides for (N, C, L) with unit channel stride.
    out_fmt = _out_format(x)
    stride_n, stride_c, stride_s = x_strides
    strides = (stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn)
    act = activation_code(activation)
    cpg = c // g
    group_size = float(cpg * s)

    def outputs(x, out=None):
        out = torch.empty_like(x, memory_format=out_fmt) if out is None else out
        mean = torch.empty((n, g), dtype=torch.float32, device=x.device)
        rstd = torch.empty((n, g), dtype=torch.float32, device=x.device)
        return out, mean, rstd

    def operands(x, weight, bias, add, scale, shift):
        """The five per-channel operands as the kernels take them (x stands in for an absent one)."""
        rows = tuple(x if t is None else t.contiguous() if cp else t
                     for t, cp in zip((add, scale, shift), copy_rows))
        return (x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous()) + rows

    if n == 0:
        return lambda x, weight, bias, eps, add, scale, shift, out=None: outputs(x, out)
    if c == 0 or s == 0:  # as torch: mean 0, rstd NaN over an empty group
        def run_empty(x, weight, bias, eps, add, scale, shift, out=None):
            out, mean, rstd = outputs(x, out)
            return out, mean.zero_(), rstd.fill_(float("nan"))
        return run_empty

    if _use_single(n, g, cpg, s, x.dtype, False, single_max, x.device):
        block_c, block_s = pow2(cpg), pow2(s)
        if gpp is None:
            gpp = default_groups_per_program(n, c, g, s, x.dtype, stride_c, x.device)
        if gpp == 0:  # one group a program
            launch = group_norm_fwd_fused_kernel[(n * g,)]
            ints = (s, g, cpg, *strides, group_size)
            consts = dict(flags, ACT=act, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_warps(block_c * block_s))
        else:  # runs of channels of gpp groups a program
            launch = group_norm_fwd_fused_groups_kernel[(n * g // gpp,)]
            ints = (s, g, *strides, group_size)
            consts = dict(flags, ACT=act, CPG=cpg, GPP=gpp, BLOCK_C=block_c, BLOCK_S=block_s,
                          num_warps=_warps(gpp * block_c * block_s))

        def run_single(x, weight, bias, eps, add, scale, shift, out=None):
            out, mean, rstd = outputs(x, out)
            launch(x, out, mean, rstd, *operands(x, weight, bias, add, scale, shift), *ints, eps, **consts)
            return out, mean, rstd
        return run_single

    cfg = _split_config(n, c, cpg, s, stride_c, _overrides.get("group_norm_split_tile"),
                        _overrides.get("group_norm_split_programs"), x.device)

    def run_split(x, weight, bias, eps, add, scale, shift, out=None):
        out, mean, rstd = outputs(x, out)
        params = operands(x, weight, bias, add, scale, shift)
        part = torch.empty((2, n, c, cfg["P"]), dtype=torch.float32, device=x.device)
        group_norm_stats_kernel[(n * cfg["n_cb"] * cfg["P"],)](
            x, part[0], part[1], params[2], c, s, cfg["n_cb"], cfg["P"], cfg["S_CHUNK"], stride_n, stride_c,
            stride_s, stride_an, HAS_ADD=flags["HAS_ADD"], BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"],
            num_warps=cfg["warps"])
        group_norm_finalize_kernel[(n * g,)](
            part[0], part[1], mean, rstd, c, s, g, cpg, cfg["P"], cfg["S_CHUNK"], group_size, eps,
            BLOCK_C=cfg["BLOCK_CG"], BLOCK_P=cfg["BLOCK_P"], num_warps=_warps(cfg["BLOCK_CG"] * cfg["BLOCK_P"], 4))
        group_norm_apply_kernel[(n * cfg["n_cb"] * cfg["n_sb"],)](
            x, out, mean, rstd, *params, c, s, g, cpg, cfg["n_cb"], cfg["n_sb"], *strides, **flags, ACT=act,
            BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["warps"])
        return out, mean, rstd
    return run_split


def group_norm_bwd(dy: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                   activation: Optional[str], mean: Tensor, rstd: Tensor, needs):
    """Fused GroupNorm backward; returns ``(dx, dweight, dbias, dadd, dscale, dshift)``.

    ``needs``: six bools in that order; a gradient is None when not needed or its input is absent.
    dy: x's shape (copied to x's layout when it differs); mean, rstd: (N, G) float32 from
    :func:`group_norm_fwd`. dx has x's dtype and layout, the others their inputs' dtypes ((C,) and
    (N, C) contiguous); all accumulate in float32 and reduce in a fixed order. Equivalent:
    ``torch.autograd.grad`` through vlfast.reference.group_norm.group_norm. The knobs
    ``group_norm_single_max``, ``group_norm_split_tile`` and ``group_norm_split_programs`` of
    :mod:`vlfast.ops._overrides` override the heuristics, as in :func:`group_norm_fwd`.
    """
    from vlfast.kernels.group_norm import (group_norm_bwd_dx_kernel, group_norm_bwd_fused_kernel,
                                           group_norm_bwd_group_kernel, group_norm_bwd_partial_kernel,
                                           group_norm_bwd_wb_kernel)

    n, c, g, s = _check(x, num_groups, activation)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"grad_output has shape {tuple(dy.shape)}, expected {tuple(x.shape)}")
    x, (stride_n, stride_c, stride_s) = _view_ncs(x)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
    if dy.stride() != x.stride():  # empty_like keeps the strides of dense tensors; guard anyway
        x, dy = x.contiguous(), dy.contiguous()
        stride_n, stride_c, stride_s = _strides_ncs(x)
    need_dx, need_dw, need_db, need_dadd, need_dscale, need_dshift = (
        bool(f) and (t is not None) for f, t in zip(needs, (x, weight, bias, add, scale, shift)))
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty((c,), dtype=weight.dtype, device=x.device) if need_dw else None
    db = torch.empty((c,), dtype=bias.dtype, device=x.device) if need_db else None
    dadd = torch.empty((n, c), dtype=add.dtype, device=x.device) if need_dadd else None
    dscale = torch.empty((n, c), dtype=scale.dtype, device=x.device) if need_dscale else None
    dshift = torch.empty((n, c), dtype=shift.dtype, device=x.device) if need_dshift else None
    if not (need_dx or need_dw or need_db or need_dadd or need_dscale or need_dshift):
        return dx, dw, db, dadd, dscale, dshift
    if n == 0 or c == 0 or s == 0:  # sums over nothing
        return dx, *(t if t is None else t.zero_() for t in (dw, db, dadd, dscale, dshift))

    cpg = c // g
    flags, (w, b, add, scale, shift), (stride_an, stride_scn, stride_shn) = _params(
        weight, bias, add, scale, shift, n, c, x)
    act = activation_code(activation)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    params = (w, b, add, scale, shift)
    strides = (stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn)
    group_size = float(cpg * s)
    need_wb = need_dw or need_db
    pwb = torch.empty((2, n, c), dtype=torch.float32, device=x.device) if need_wb else mean.new_empty((2, 1))
    outs = (dadd if need_dadd else mean, dscale if need_dscale else mean, dshift if need_dshift else mean,
            pwb[0], pwb[1])
    needs_ch = dict(NEED_DADD=need_dadd, NEED_DSCALE=need_dscale, NEED_DSHIFT=need_dshift, NEED_WB=need_wb)

    if _use_single(n, g, cpg, s, x.dtype, True, _overrides.get("group_norm_single_max"), x.device):
        block_c, block_s = pow2(cpg), pow2(s)
        group_norm_bwd_fused_kernel[(n * g,)](
            x, dy, dx if need_dx else x, mean, rstd, *params, *outs, c, s, g, cpg, *strides, group_size,
            **flags, ACT=act, NEED_DX=need_dx, **needs_ch, BLOCK_C=block_c, BLOCK_S=block_s,
            num_warps=_warps(2 * block_c * block_s))
    else:
        cfg = _split_config(n, c, cpg, s, stride_c, _overrides.get("group_norm_split_tile"),
                            _overrides.get("group_norm_split_programs"), x.device)
        part = torch.empty((3, n, c, cfg["P"]), dtype=torch.float32, device=x.device)
        mterms = torch.empty((2, n, g), dtype=torch.float32, device=x.device)
        group_norm_bwd_partial_kernel[(n * cfg["n_cb"] * cfg["P"],)](
            x, dy, mean, rstd, *params, part[0], part[1], part[2], c, s, g, cpg, cfg["n_cb"], cfg["P"],
            cfg["S_CHUNK"], *strides, **flags, ACT=act, NEED_SX=need_dadd, BLOCK_C=cfg["BLOCK_C"],
            BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["warps"])
        group_norm_bwd_group_kernel[(n * g,)](
            part[0], part[1], part[2], rstd, w, b, scale, mterms, *outs, n, c, s, g, cpg, cfg["P"], stride_scn,
            group_size, HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], HAS_SCALE=flags["HAS_SCALE"], **needs_ch,
            NEED_CHANNEL=need_dadd or need_dscale or need_dshift or need_wb, BLOCK_C=cfg["BLOCK_CG"],
            BLOCK_P=cfg["BLOCK_P"], num_warps=_warps(cfg["BLOCK_CG"] * cfg["BLOCK_P"], 4))
        if need_dx:
            group_norm_bwd_dx_kernel[(n * cfg["n_cb"] * cfg["n_sb"],)](
                x, dy, dx, mean, rstd, mterms, *params, n, c, s, g, cpg, cfg["n_cb"], cfg["n_sb"], *strides,
                **flags, ACT=act, BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["warps"])

    if need_wb:
        block_c = min(pow2(c), 256)
        block_n = min(pow2(n), max(1, 2048 // block_c))
        group_norm_bwd_wb_kernel[(cdiv(c, block_c),)](
            pwb[0], pwb[1], dw if need_dw else pwb, db if need_db else pwb, n, c, NEED_DW=need_dw,
            NEED_DB=need_db, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_warps(block_n * block_c, 8))
    return dx, dw, db, dadd, dscale, dshift
