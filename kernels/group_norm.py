"""Triton kernels of GroupNorm fused with the time-embedding add, scale-shift and activation
(spec: vlfast/reference/group_norm.py; launchers: vlfast/ops/group_norm_triton.py).

The input is viewed as (N, C, S), element (n, c, s) at n*stride_n + c*stride_c + s*stride_s, so
NCHW (stride_s = 1) and channels_last (stride_c = 1) run without layout copies; outputs share x's
strides. Two paths each way:

- single pass: one program per (sample, group) holds the whole group in registers and reads x once;
  with unit channel stride (channels_last), one program per GPP consecutive groups of a sample, so
  that each position is read as one run of GPP * C/G channels rather than C/G;
- split: per-channel partials over (sample, channel block, spatial chunk) go to a float32 buffer,
  one program per (sample, group) combines them in a fixed order, and an elementwise kernel over
  (sample, channel block, spatial block) writes the output.

Statistics are float32 (two-pass within a single-pass program; shifted sums within a chunk of the
split path; Chan's combination across chunks). Every reduction is a tl.sum or a loop in a fixed order,
never an atomic: results are bit-identical run to run.
"""

import triton
import triton.language as tl

from .activation import ACT_NONE
from .activation import act as _act
from .activation import act_backward as _act_backward


@triton.jit
def _channel_params(n, c, cmask, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an, stride_scn, stride_shn,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_SHIFT: tl.constexpr):
    """float32 (add, weight, bias, 1 + scale, shift) at channels c (any shape) of sample n; defaults when absent."""
    nl = n.to(tl.int64)
    zero = tl.zeros_like(c).to(tl.float32)
    a = zero
    w = zero + 1.0
    b = zero
    k = zero + 1.0
    sh = zero
    if HAS_ADD:
        a = tl.load(add_ptr + nl * stride_an + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        k = 1.0 + tl.load(scale_ptr + nl * stride_scn + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + nl * stride_shn + c, mask=cmask, other=0.0).to(tl.float32)
    return a, w, b, k, sh


@triton.jit
def _expand(v, AXIS: tl.constexpr):
    """A per-channel vector [C] as a column [C, 1] (AXIS 0) or a row [1, C] (AXIS 1) of a 2-D tile."""
    if AXIS == 0:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _tile_params(n, c, cmask, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an, stride_scn, stride_shn,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_SHIFT: tl.constexpr, AXIS: tl.constexpr):
    """_channel_params for the channels c [C] (mask cmask) of a 2-D tile whose channel axis is AXIS: loaded as
    vectors, then broadcast. Loading them in the tile's own 2-D shape costs one load per element each
    (compiled for sm_90: 192 per thread at 16x256x64x64, against 24 this way)."""
    a, w, b, k, sh = _channel_params(n, c, cmask, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                     stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT)
    return _expand(a, AXIS), _expand(w, AXIS), _expand(b, AXIS), _expand(k, AXIS), _expand(sh, AXIS)


@triton.jit
def _group_stat(ptr, n, c, cmask, G, CPG, AXIS: tl.constexpr):
    """A per-group float32 statistic (N, G) at the channels c [C] of sample n, broadcast like _tile_params."""
    return _expand(tl.load(ptr + n.to(tl.int64) * G + c // CPG, mask=cmask, other=0.0), AXIS)


# ---------------------------------------------------------------- forward
@triton.jit
def group_norm_fwd_fused_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    out_ptr,    # (N, C, S) output, x's dtype and strides
    mean_ptr,   # (N, G) float32 mean of each group
    rstd_ptr,   # (N, G) float32 1 / sqrt(var + eps)
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    add_ptr,    # (N, C) added before the statistics, row stride stride_an
    scale_ptr,  # (N, C) scale, row stride stride_scn
    shift_ptr,  # (N, C) shift, row stride stride_shn
    S, G, CPG, stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn, group_size, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    # Stage 1: the whole group (BLOCK_C >= C/G channels x BLOCK_S >= S positions) into registers.
    cl = tl.arange(0, BLOCK_C)
    c = g * CPG + cl[:, None]
    cmask = cl[:, None] < CPG
    s = tl.arange(0, BLOCK_S)[None, :]
    mask = cmask & (s < S)
    base = n.to(tl.int64) * stride_n
    a, w, b, k, sh = _tile_params(n, g * CPG + cl, cl < CPG, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                  stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT, 0)
    h = tl.load(x_ptr + base + c * stride_c + s * stride_s, mask=mask, other=0.0).to(tl.float32) + a

    # Stage 2: two-pass statistics in float32.
    mean = tl.sum(tl.where(mask, h, 0.0)) / group_size
    d = tl.where(mask, h - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(d * d) / group_size + eps)

    # Stage 3: normalise, affine, scale-shift, activation; write.
    y = _act(d * (rstd * w * k) + (b * k + sh), ACT)
    tl.store(out_ptr + base + c * stride_c + s * stride_s, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def _per_channel(v, GPP: tl.constexpr, BLOCK_C: tl.constexpr):
    """[GPP] values of the groups -> [1, GPP * BLOCK_C], each repeated over its group's BLOCK_C channels."""
    return tl.reshape(tl.broadcast_to(v[:, None], [GPP, BLOCK_C]), [1, GPP * BLOCK_C])


@triton.jit
def _group_sums(t, GPP: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_S, GPP * BLOCK_C] -> [GPP]: per-channel sums over the positions, then over each group's channels."""
    return tl.sum(tl.reshape(tl.sum(t, axis=0), [GPP, BLOCK_C]), axis=1)


@triton.jit
def group_norm_fwd_fused_groups_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s); fast with stride_c = 1
    out_ptr,    # (N, C, S) output, x's dtype and strides
    mean_ptr,   # (N, G) float32 mean of each group
    rstd_ptr,   # (N, G) float32 1 / sqrt(var + eps)
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    add_ptr,    # (N, C) added before the statistics, row stride stride_an
    scale_ptr,  # (N, C) scale, row stride stride_scn
    shift_ptr,  # (N, C) shift, row stride stride_shn
    S, G, stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn, group_size, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, CPG: tl.constexpr, GPP: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The single pass over GPP consecutive groups of one sample (channels_last): the tile is
    [BLOCK_S positions, GPP * BLOCK_C channels], channels the inner axis, so each position is read as
    one run of GPP * CPG channels; column t of the tile is channel t % BLOCK_C of group t // BLOCK_C."""
    pid = tl.program_id(0)
    n = pid // (G // GPP)
    g0 = pid % (G // GPP) * GPP
    # Stage 1: the GPP groups (GPP x BLOCK_C >= C/G channels, BLOCK_S >= S positions) into registers.
    t = tl.arange(0, GPP * BLOCK_C)
    if CPG == BLOCK_C:  # no padding: one contiguous run, an all-true channel mask (full-width vector loads)
        c1 = g0 * CPG + t
        cmask1 = tl.full([GPP * BLOCK_C], True, tl.int1)
    else:
        c1 = g0 * CPG + t // BLOCK_C * CPG + t % BLOCK_C
        cmask1 = t % BLOCK_C < CPG
    c = c1[None, :]
    cmask = cmask1[None, :]
    s = tl.arange(0, BLOCK_S)[:, None]
    mask = cmask & (s < S)
    base = n.to(tl.int64) * stride_n
    a, w, b, k, sh = _tile_params(n, c1, cmask1, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                  stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT, 1)
    h = tl.load(x_ptr + base + c * stride_c + s * stride_s, mask=mask, other=0.0).to(tl.float32) + a

    # Stage 2: two-pass statistics of each group in float32.
    mean = _group_sums(tl.where(mask, h, 0.0), GPP, BLOCK_C) / group_size
    d = tl.where(mask, h - _per_channel(mean, GPP, BLOCK_C), 0.0)
    rstd = tl.rsqrt(_group_sums(d * d, GPP, BLOCK_C) / group_size + eps)

    # Stage 3: normalise, affine, scale-shift, activation; write.
    y = _act(d * (_per_channel(rstd, GPP, BLOCK_C) * w * k) + (b * k + sh), ACT)
    tl.store(out_ptr + base + c * stride_c + s * stride_s, y.to(out_ptr.dtype.element_ty), mask=mask)
    grp = n.to(tl.int64) * G + g0 + tl.arange(0, GPP)
    tl.store(mean_ptr + grp, mean)
    tl.store(rstd_ptr + grp, rstd)


@triton.jit
def group_norm_stats_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    pmean_ptr,  # (N, C, P) float32 partial means, one per channel and spatial chunk
    pm2_ptr,    # (N, C, P) float32 partial sums of squared deviations
    add_ptr,    # (N, C) added before the statistics, row stride stride_an
    C, S, n_cb, P, S_CHUNK, stride_n, stride_c, stride_s, stride_an,
    HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    sc = pid % P
    n = pid // P // n_cb
    cb = pid // P % n_cb
    c1 = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[:, None]
    cmask = c < C
    base = n.to(tl.int64) * stride_n
    s_lo = sc * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)
    # Stage 1: sums of d = x - K and d^2 with K each channel's first element of the chunk (a shifted sum:
    # no cancellation of large means), accumulated elementwise over the tiles; one reduction at the end.
    k0 = tl.load(x_ptr + base + c1 * stride_c + s_lo * stride_s, mask=c1 < C, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[None, :]
        mask = cmask & (s < s_hi)
        d = tl.where(mask, tl.load(x_ptr + base + c * stride_c + s * stride_s, mask=mask, other=0.0).to(tl.float32)
                     - k0[:, None], 0.0)
        acc1 += d
        acc2 += d * d
    # Stage 2: this chunk's mean (of x + add) and M2 = sum d^2 - (sum d)^2 / count.
    count = (s_hi - s_lo).to(tl.float32)
    s1 = tl.sum(acc1, axis=1)
    dm = s1 / count
    mean = k0 + dm
    if HAS_ADD:
        mean += tl.load(add_ptr + n.to(tl.int64) * stride_an + c1, mask=c1 < C, other=0.0).to(tl.float32)
    m2 = tl.maximum(tl.sum(acc2, axis=1) - s1 * dm, 0.0)
    off = (n.to(tl.int64) * C + c1) * P + sc
    tl.store(pmean_ptr + off, mean, mask=c1 < C)
    tl.store(pm2_ptr + off, m2, mask=c1 < C)


@triton.jit
def group_norm_finalize_kernel(
    pmean_ptr,  # (N, C, P) float32 partial means
    pm2_ptr,    # (N, C, P) float32 partial M2
    mean_ptr,   # (N, G) float32 mean of each group
    rstd_ptr,   # (N, G) float32 1 / sqrt(var + eps)
    C, S, G, CPG, P, S_CHUNK, group_size, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    p = tl.arange(0, BLOCK_P)[None, :]
    cnt = tl.minimum(S_CHUNK, S - p * S_CHUNK).to(tl.float32)  # elements behind each partial
    row = (n.to(tl.int64) * C + g * CPG) * P
    # Stage 1: the group mean, sum of count * partial mean over (channel, chunk) in a fixed order.
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)[:, None]
        m = (cl < CPG) & (p < P)
        pm = tl.load(pmean_ptr + row + cl * P + p, mask=m, other=0.0)
        acc += tl.where(m, cnt * pm, 0.0)
    mean = tl.sum(acc) / group_size
    # Stage 2: M2 of the group = sum of partial M2 + count * (partial mean - mean)^2.
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)[:, None]
        m = (cl < CPG) & (p < P)
        pm = tl.load(pmean_ptr + row + cl * P + p, mask=m, other=0.0)
        pm2 = tl.load(pm2_ptr + row + cl * P + p, mask=m, other=0.0)
        acc += tl.where(m, pm2 + cnt * (pm - mean) * (pm - mean), 0.0)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, tl.rsqrt(tl.sum(acc) / group_size + eps))


@triton.jit
def group_norm_apply_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    out_ptr,    # (N, C, S) output, x's dtype and strides
    mean_ptr,   # (N, G) float32
    rstd_ptr,   # (N, G) float32
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    add_ptr,    # (N, C) row stride stride_an
    scale_ptr,  # (N, C) row stride stride_scn
    shift_ptr,  # (N, C) row stride stride_shn
    C, S, G, CPG, n_cb, n_sb, stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    sb = pid % n_sb
    n = pid // n_sb // n_cb
    cb = pid // n_sb % n_cb
    # Stage 1: per-channel coefficients; a channel block may span several groups.
    c1 = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[:, None]
    cmask = c < C
    mean = _group_stat(mean_ptr, n, c1, c1 < C, G, CPG, 0)
    rstd = _group_stat(rstd_ptr, n, c1, c1 < C, G, CPG, 0)
    a, w, b, k, sh = _tile_params(n, c1, c1 < C, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                  stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT, 0)
    # Stage 2: normalise, affine, scale-shift, activation; write.
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    mask = cmask & (s < S)
    offs = n.to(tl.int64) * stride_n + c * stride_c + s * stride_s
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + a
    y = _act((h - mean) * (rstd * w * k) + (b * k + sh), ACT)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward
# With g1 = dy * act'(y1), the per-(n, c) sums sg = sum_s g1, sgx = sum_s g1 * xhat, sx = sum_s xhat and
# e = w * (1 + scale) give every gradient:
#   dshift = sg, dscale = w * sgx + b * sg, dbias = sum_n (1 + scale) sg, dweight = sum_n (1 + scale) sgx,
#   m1 = sum_c e sg / |group|, m2 = sum_c e sgx / |group|,  dx = rstd * (e g1 - m1 - xhat m2),
#   dadd = sum_s dx = rstd * (e sg - S m1 - m2 sx).
@triton.jit
def _grad_tile(x_ptr, dy_ptr, offs, mask, a, w, b, k, sh, mean, rstd, ACT: tl.constexpr):
    """(g1, xhat) on one tile, zero where masked."""
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + a
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    g1 = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != ACT_NONE:
        g1 = tl.where(mask, _act_backward(g1, (xhat * w + b) * k + sh, ACT), 0.0)
    return g1, xhat


@triton.jit
def _store_channel_grads(n, c, cmask, C, S, sg, sgx, sx, w, b, k, rstd, m1, m2,
                         dadd_ptr, dscale_ptr, dshift_ptr, pdb_ptr, pdw_ptr,
                         NEED_DADD: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
                         NEED_WB: tl.constexpr):
    """Per-(n, c) gradients, and the per-sample terms of dweight and dbias (reduced over n later)."""
    off = n.to(tl.int64) * C + c
    if NEED_DSHIFT:
        tl.store(dshift_ptr + off, sg.to(dshift_ptr.dtype.element_ty), mask=cmask)
    if NEED_DSCALE:
        tl.store(dscale_ptr + off, (w * sgx + b * sg).to(dscale_ptr.dtype.element_ty), mask=cmask)
    if NEED_DADD:
        dadd = rstd * (w * k * sg - S * m1 - m2 * sx)
        tl.store(dadd_ptr + off, dadd.to(dadd_ptr.dtype.element_ty), mask=cmask)
    if NEED_WB:
        tl.store(pdb_ptr + off, k * sg, mask=cmask)
        tl.store(pdw_ptr + off, k * sgx, mask=cmask)


@triton.jit
def group_norm_bwd_fused_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    dy_ptr,     # (N, C, S) output gradient, x's strides
    dx_ptr,     # (N, C, S) input gradient, x's dtype and strides
    mean_ptr,   # (N, G) float32 saved mean
    rstd_ptr,   # (N, G) float32 saved rstd
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    add_ptr,    # (N, C) row stride stride_an
    scale_ptr,  # (N, C) row stride stride_scn
    shift_ptr,  # (N, C) row stride stride_shn
    dadd_ptr,   # (N, C) contiguous, add's dtype
    dscale_ptr,  # (N, C) contiguous, scale's dtype
    dshift_ptr,  # (N, C) contiguous, shift's dtype
    pdb_ptr,    # (N, C) float32 per-sample dbias terms
    pdw_ptr,    # (N, C) float32 per-sample dweight terms
    C, S, G, CPG, stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn, group_size,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DADD: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr, NEED_WB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    # Stage 1: the group's x and dy into registers; g1 and xhat.
    cl = tl.arange(0, BLOCK_C)
    c = g * CPG + cl[:, None]
    cmask = cl[:, None] < CPG
    s = tl.arange(0, BLOCK_S)[None, :]
    mask = cmask & (s < S)
    offs = n.to(tl.int64) * stride_n + c * stride_c + s * stride_s
    a, w, b, k, sh = _tile_params(n, g * CPG + cl, cl < CPG, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                  stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT, 0)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    g1, xhat = _grad_tile(x_ptr, dy_ptr, offs, mask, a, w, b, k, sh, mean, rstd, ACT)

    # Stage 2: per-channel sums, then the group terms m1, m2.
    sg = tl.sum(g1, axis=1, keep_dims=True)
    sgx = tl.sum(g1 * xhat, axis=1, keep_dims=True)
    sx = tl.sum(xhat, axis=1, keep_dims=True)
    e = w * k
    m1 = tl.sum(e * sg) / group_size
    m2 = tl.sum(e * sgx) / group_size

    # Stage 3: dx, then the per-channel gradients.
    if NEED_DX:
        dx = rstd * (g1 * e - m1 - xhat * m2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    _store_channel_grads(n, c, cmask, C, S, sg, sgx, sx, w, b, k, rstd, m1, m2, dadd_ptr, dscale_ptr,
                         dshift_ptr, pdb_ptr, pdw_ptr, NEED_DADD, NEED_DSCALE, NEED_DSHIFT, NEED_WB)


@triton.jit
def group_norm_bwd_partial_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    dy_ptr,     # (N, C, S) output gradient, x's strides
    mean_ptr,   # (N, G) float32 saved mean
    rstd_ptr,   # (N, G) float32 saved rstd
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    add_ptr,    # (N, C) row stride stride_an
    scale_ptr,  # (N, C) row stride stride_scn
    shift_ptr,  # (N, C) row stride stride_shn
    psg_ptr,    # (N, C, P) float32 partial sums of g1
    psgx_ptr,   # (N, C, P) float32 partial sums of g1 * xhat
    psx_ptr,    # (N, C, P) float32 partial sums of xhat
    C, S, G, CPG, n_cb, P, S_CHUNK, stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, NEED_SX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    sc = pid % P
    n = pid // P // n_cb
    cb = pid // P % n_cb
    c1 = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[:, None]
    cmask = c < C
    mean = _group_stat(mean_ptr, n, c1, c1 < C, G, CPG, 0)
    rstd = _group_stat(rstd_ptr, n, c1, c1 < C, G, CPG, 0)
    a, w, b, k, sh = _tile_params(n, c1, c1 < C, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                  stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT, 0)
    s_lo = sc * S_CHUNK
    s_hi = tl.minimum(s_lo + S_CHUNK, S)
    # Stage 1: accumulate g1, g1 * xhat, xhat elementwise over the chunk's tiles.
    acc_g = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_x = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[None, :]
        mask = cmask & (s < s_hi)
        offs = n.to(tl.int64) * stride_n + c * stride_c + s * stride_s
        g1, xhat = _grad_tile(x_ptr, dy_ptr, offs, mask, a, w, b, k, sh, mean, rstd, ACT)
        acc_g += g1
        acc_gx += g1 * xhat
        if NEED_SX:
            acc_x += xhat
    # Stage 2: reduce the tile and write this chunk's sums.
    off = (n.to(tl.int64) * C + c) * P + sc
    tl.store(psg_ptr + off, tl.sum(acc_g, axis=1, keep_dims=True), mask=cmask)
    tl.store(psgx_ptr + off, tl.sum(acc_gx, axis=1, keep_dims=True), mask=cmask)
    if NEED_SX:
        tl.store(psx_ptr + off, tl.sum(acc_x, axis=1, keep_dims=True), mask=cmask)


@triton.jit
def _channel_sums(ptr, row, cl, p, cmask, P):
    """Per-channel sum over the P chunks, in a fixed order (one tl.sum)."""
    m = cmask & (p < P)
    return tl.sum(tl.load(ptr + row + cl * P + p, mask=m, other=0.0), axis=1, keep_dims=True)


@triton.jit
def group_norm_bwd_group_kernel(
    psg_ptr,    # (N, C, P) float32 partial sums of g1
    psgx_ptr,   # (N, C, P) float32 partial sums of g1 * xhat
    psx_ptr,    # (N, C, P) float32 partial sums of xhat
    rstd_ptr,   # (N, G) float32 saved rstd
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    scale_ptr,  # (N, C) row stride stride_scn
    m_ptr,      # (2, N, G) float32 out: m1, m2 of each group
    dadd_ptr,   # (N, C) contiguous, add's dtype
    dscale_ptr,  # (N, C) contiguous, scale's dtype
    dshift_ptr,  # (N, C) contiguous, shift's dtype
    pdb_ptr,    # (N, C) float32 per-sample dbias terms
    pdw_ptr,    # (N, C) float32 per-sample dweight terms
    N, C, S, G, CPG, P, stride_scn, group_size,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_DADD: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr, NEED_WB: tl.constexpr, NEED_CHANNEL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    p = tl.arange(0, BLOCK_P)[None, :]
    row = (n.to(tl.int64) * C + g * CPG) * P
    rstd = tl.load(rstd_ptr + pid)
    # Stage 1: m1, m2 over the group's channels, in a fixed order.
    acc1 = tl.zeros([BLOCK_C, 1], tl.float32)
    acc2 = tl.zeros([BLOCK_C, 1], tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        cl = c0 + tl.arange(0, BLOCK_C)[:, None]
        cmask = cl < CPG
        c = g * CPG + cl
        _, w, b, k, _ = _channel_params(n, c, cmask, w_ptr, b_ptr, w_ptr, scale_ptr, w_ptr, 0, stride_scn, 0,
                                        HAS_W, HAS_B, False, HAS_SCALE, False)
        acc1 += w * k * _channel_sums(psg_ptr, row, cl, p, cmask, P)
        acc2 += w * k * _channel_sums(psgx_ptr, row, cl, p, cmask, P)
    m1 = tl.sum(acc1) / group_size
    m2 = tl.sum(acc2) / group_size
    tl.store(m_ptr + pid, m1)
    tl.store(m_ptr + N * G + pid, m2)
    # Stage 2: the per-channel gradients (the chunk sums again, same order).
    if NEED_CHANNEL:  # any of the four above
        for c0 in range(0, CPG, BLOCK_C):
            cl = c0 + tl.arange(0, BLOCK_C)[:, None]
            cmask = cl < CPG
            c = g * CPG + cl
            _, w, b, k, _ = _channel_params(n, c, cmask, w_ptr, b_ptr, w_ptr, scale_ptr, w_ptr, 0, stride_scn, 0,
                                            HAS_W, HAS_B, False, HAS_SCALE, False)
            sg = _channel_sums(psg_ptr, row, cl, p, cmask, P)
            sgx = _channel_sums(psgx_ptr, row, cl, p, cmask, P)
            sx = sg
            if NEED_DADD:
                sx = _channel_sums(psx_ptr, row, cl, p, cmask, P)
            _store_channel_grads(n, c, cmask, C, S, sg, sgx, sx, w, b, k, rstd, m1, m2, dadd_ptr, dscale_ptr,
                                 dshift_ptr, pdb_ptr, pdw_ptr, NEED_DADD, NEED_DSCALE, NEED_DSHIFT, NEED_WB)


@triton.jit
def group_norm_bwd_dx_kernel(
    x_ptr,      # (N, C, S) input, strides (stride_n, stride_c, stride_s)
    dy_ptr,     # (N, C, S) output gradient, x's strides
    dx_ptr,     # (N, C, S) input gradient, x's dtype and strides
    mean_ptr,   # (N, G) float32 saved mean
    rstd_ptr,   # (N, G) float32 saved rstd
    m_ptr,      # (2, N, G) float32 m1, m2 of each group
    w_ptr,      # (C,) weight
    b_ptr,      # (C,) bias
    add_ptr,    # (N, C) row stride stride_an
    scale_ptr,  # (N, C) row stride stride_scn
    shift_ptr,  # (N, C) row stride stride_shn
    N, C, S, G, CPG, n_cb, n_sb, stride_n, stride_c, stride_s, stride_an, stride_scn, stride_shn,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    sb = pid % n_sb
    n = pid // n_sb // n_cb
    cb = pid // n_sb % n_cb
    # Stage 1: per-channel terms; a channel block may span several groups.
    c1 = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[:, None]
    cmask = c < C
    mean = _group_stat(mean_ptr, n, c1, c1 < C, G, CPG, 0)
    rstd = _group_stat(rstd_ptr, n, c1, c1 < C, G, CPG, 0)
    m1 = _group_stat(m_ptr, n, c1, c1 < C, G, CPG, 0)
    m2 = _group_stat(m_ptr + N * G, n, c1, c1 < C, G, CPG, 0)
    a, w, b, k, sh = _tile_params(n, c1, c1 < C, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, stride_an,
                                  stride_scn, stride_shn, HAS_W, HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT, 0)
    # Stage 2: dx on one tile.
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    mask = cmask & (s < S)
    offs = n.to(tl.int64) * stride_n + c * stride_c + s * stride_s
    g1, xhat = _grad_tile(x_ptr, dy_ptr, offs, mask, a, w, b, k, sh, mean, rstd, ACT)
    dx = rstd * (g1 * (w * k) - m1 - xhat * m2)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_bwd_wb_kernel(
    pdb_ptr,    # (N, C) float32 per-sample dbias terms
    pdw_ptr,    # (N, C) float32 per-sample dweight terms
    dw_ptr,     # (C,) weight gradient, weight's dtype
    db_ptr,     # (C,) bias gradient, bias's dtype
    N, C,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    cmask = c < C
    # Stage 1: accumulate over the batch in a fixed order; one tl.sum at the end.
    acc_b = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    acc_w = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)[:, None]
        m = (n < N) & cmask
        off = n.to(tl.int64) * C + c
        if NEED_DB:
            acc_b += tl.load(pdb_ptr + off, mask=m, other=0.0)
        if NEED_DW:
            acc_w += tl.load(pdw_ptr + off, mask=m, other=0.0)
    # Stage 2: write in the parameters' dtypes.
    if NEED_DB:
        tl.store(db_ptr + c, tl.sum(acc_b, axis=0, keep_dims=True).to(db_ptr.dtype.element_ty), mask=cmask)
    if NEED_DW:
        tl.store(dw_ptr + c, tl.sum(acc_w, axis=0, keep_dims=True).to(dw_ptr.dtype.element_ty), mask=cmask)
