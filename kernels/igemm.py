"""The implicit-GEMM core of vlfast's convolution kernels (callers: kernels/conv_transpose.py; host-side
tile rules, precision and weight arrangement: vlfast/ops/igemm.py).

A convolution is a GEMM whose A operand is gathered from the input on the fly: rows are output
positions (any decoding of the caller's choice), K runs over taps x input channels of one group, and
tap j, (jh, jw) = divmod(j, n_tw), of row r reads input pixel (IH0 + ih0[r] + jh*DIH, IW0 + iw0[r] + jw*DIW)
against a [CIN_G, LDW] weight matrix: matrix j of a weight laid out [tap, ci, column] ("dense taps"),
or, for a phase of a transposed convolution, its tap (kh0 + jh*DKH, kw0 + jw*DKW) of a [KH, KW] kernel
("phase taps", ``w_taps``). That covers

- the sub-pixel transposed convolution (one GEMM over output cells): IH0 = the first cell row, ih0 =
  the cell row, DIH = -1, dense taps of Wsp[(th, tw, ci), (rh, rw, co)], LDW = SH*SW*Cout/G;
- each phase of a transposed convolution: ih0 = the phase's first input row per row, DIH =
  -d/gcd(d, s), phase taps of Wt[KH, KW, Cin/G, Cout/G], LDW = Cout/G;
- a (dilated, strided) Conv2d: IH0 = -padding, ih0 = oh*stride, DIH = dilation, dense taps of its
  weight (Cout, Cin/G, KH, KW) arranged to [G, KH, KW, Cin/G, Cout/G], LDW = Cout/G (the transposed
  convolution's input gradient is one of these, with the flipped roles of Cin and Cout).

The pieces, each a @triton.jit function inlined into its caller:

- ``load_x_tile``: a [rows, channels] input tile through any strides, 0 outside the image, with an
  optional prologue ``act(x * a[n, c] + b[n, c])`` (a normalisation's affine and activation applied
  on load; outside the image the tile stays 0, as the convolution's zero padding is);
- ``k_loop``: acc += A @ W over taps x channel chunks, one flat loop so that the compiler pipelines it
  as one K loop (a K tile never straddles two taps); ``ONE_TAP`` is the plain-GEMM fast path;
- ``epilogue``: bias, activation, an optional residual add, the store through any output strides (e.g.
  a channel slice of a concat buffer), and optional per-(sample, group) partial sums of the stored values
  (``tile_group_sums``: what a following GroupNorm needs);
- ``store_w_rows``: the epilogue of the sub-pixel kernel's NCHW output, as whole row segments;
- ``swizzle``: the grouped program order that keeps a column tile in L2 while row tiles use it.

Accumulation is float32 in ``tl.dot`` with the caller's ``input_precision``; every index inside one
sample is int32 (the launchers check a sample holds fewer than 2**31 elements), sample offsets int64.
"""

import triton
import triton.language as tl

from .activation import act as _act


@triton.jit
def load_x_tile(x_ptr, x_row, ih, iw, row_ok, ci, ci_ok, H, W, stride_xc, stride_xh, stride_xw,
                pro_a_ptr=None, pro_b_ptr=None, pro_row=None, PROLOGUE: tl.constexpr = False,
                PRO_ACT: tl.constexpr = 0):
    """The [BLOCK_M, BLOCK_K] tile x[n_r, ci, ih[r], iw[r]], 0 where row_ok, ci_ok or the image say no.

    x_ptr: (N, C, H, W) input, any strides; x_row [BLOCK_M] (or a scalar where all rows are in one sample):
    int64 offset of (n_r, the group's first channel); ih, iw, row_ok [BLOCK_M]; ci, ci_ok [BLOCK_K]:
    channels within the group.
    PROLOGUE: the tile becomes act(x * a[n_r, c] + b[n_r, c]) (PRO_ACT; computed in float32, then cast
    back to x's type), 0 where it was masked. pro_a_ptr, pro_b_ptr: (N, C) float32, contiguous;
    pro_row [BLOCK_M]: n_r * C + the group's first channel. Unused without PROLOGUE.
    """
    ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = x_ptr + (x_row + ih * stride_xh + iw * stride_xw)[:, None] + (ci * stride_xc)[None, :]
    x = tl.load(ptrs, mask=ok[:, None] & ci_ok[None, :], other=0.0)
    if PROLOGUE:  # act(x * a + b) inside the image; 0 (the convolution's zero padding) outside
        nc = pro_row[:, None] + ci[None, :]
        nc_ok = row_ok[:, None] & ci_ok[None, :]
        a = tl.load(pro_a_ptr + nc, mask=nc_ok, other=0.0)
        b = tl.load(pro_b_ptr + nc, mask=nc_ok, other=0.0)
        y = _act(x.to(tl.float32) * a + b, PRO_ACT)
        x = tl.where(ok[:, None] & ci_ok[None, :], y, 0.0).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def k_loop(acc, x_ptr, w_ptr, x_row, IH0, IW0, ih0, iw0, row_ok, cols, col_ok, n_taps, n_tw, DIH, DIW, CIN_G, LDW,
           H, W, stride_xc, stride_xh, stride_xw, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
           ONE_TAP: tl.constexpr = False, w_taps=None, pro_a_ptr=None, pro_b_ptr=None, pro_row=None,
           PROLOGUE: tl.constexpr = False, PRO_ACT: tl.constexpr = 0):
    """acc [BLOCK_M, BLOCK_N] += sum over taps j < n_taps and channels ci < CIN_G of
    x[n_r, ci, IH0 + ih0[r] + jh*DIH, IW0 + iw0[r] + jw*DIW] * w[t(j), ci, cols[c]], (jh, jw) = divmod(j, n_tw).

    x_ptr, x_row, row_ok and the prologue (PROLOGUE, PRO_ACT, pro_*): as ``load_x_tile``; IH0, IW0
    (scalars) + ih0, iw0 [BLOCK_M]: tap 0's input pixel per row. w_ptr: the group's weight, contiguous
    [taps, CIN_G, LDW]; cols, col_ok [BLOCK_N]: the tile's columns of it. Weight matrix t(j) is j (dense
    taps: the sub-pixel GEMM, a Conv2d), or, with w_taps = (kh0, kw0, DKH, DKW, KW), a phase's tap
    (kh0 + jh*DKH, kw0 + jw*DKW) of a [KH, KW] kernel: t(j) = (kh0 + jh*DKH)*KW + kw0 + jw*DKW.
    ONE_TAP: n_taps == 1 (tap 0 only, no divisions).
    """
    rk = tl.arange(0, BLOCK_K)
    chunks = tl.cdiv(CIN_G, BLOCK_K)
    # One flat loop over (tap, channel chunk): the compiler pipelines it as one K loop.
    for it in range(0, n_taps * chunks):
        if ONE_TAP:
            tap = 0
        else:
            tap = it // chunks
        ci = (it - tap * chunks) * BLOCK_K + rk
        ci_ok = ci < CIN_G
        # Each form keeps the exact arithmetic its kernel was tuned with (the order of the adds, 32- or 64-bit
        # tap offsets): the compiled code, registers included, follows it.
        if w_taps is None:  # dense taps: weight matrix j, one 32-bit offset within the group
            a = load_x_tile(x_ptr, x_row, IH0 + ih0 - tap // n_tw * -DIH, IW0 + iw0 - tap % n_tw * -DIW, row_ok,
                            ci, ci_ok, H, W, stride_xc, stride_xh, stride_xw, pro_a_ptr, pro_b_ptr, pro_row,
                            PROLOGUE, PRO_ACT)
            w_rows = w_ptr + ((tap * CIN_G + ci) * LDW)[:, None]
        else:  # phase taps: the tap's matrix (64-bit offset), then the rows within it
            kh0, kw0, DKH, DKW, KW = w_taps
            jh = tap // n_tw
            jw = tap - jh * n_tw
            a = load_x_tile(x_ptr, x_row, IH0 + ih0 + jh * DIH, IW0 + iw0 + jw * DIW, row_ok, ci, ci_ok, H, W,
                            stride_xc, stride_xh, stride_xw, pro_a_ptr, pro_b_ptr, pro_row, PROLOGUE, PRO_ACT)
            w_tap = w_ptr + ((kh0 + jh * DKH) * KW + (kw0 + jw * DKW)).to(tl.int64) * CIN_G * LDW
            w_rows = w_tap + (ci * LDW)[:, None]
        b = tl.load(w_rows + cols[None, :], mask=ci_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def tile_group_sums(y, mask, col_ok, stats_ptr, seg0, SEG: tl.constexpr):
    """Partial GroupNorm statistics of one tile whose rows are all in one sample and whose columns are
    consecutive output channels starting at channel seg0*SEG: stats[seg0 + s] = (sum, sum of squares) of
    y over the tile's rows and columns [s*SEG, (s + 1)*SEG), for each segment s with a valid column.

    y, mask [BLOCK_M, BLOCK_N]: the stored values and where they were stored; col_ok [BLOCK_N].
    stats_ptr: this tile's row of a float32 (..., channels / SEG, 2) partial-sum buffer. SEG: a power of
    two dividing BLOCK_N, the channels per group and the first channel of every column tile (e.g. Cout/G
    of a grouped convolution); the host adds up the segments and tiles of each group.
    """
    BLOCK_N: tl.constexpr = y.shape[1]
    v = tl.where(mask, y.to(tl.float32), 0.0)
    s1 = tl.sum(tl.reshape(tl.sum(v, axis=0), (BLOCK_N // SEG, SEG)), axis=1)
    s2 = tl.sum(tl.reshape(tl.sum(v * v, axis=0), (BLOCK_N // SEG, SEG)), axis=1)
    seg_ok = tl.max(tl.reshape(col_ok.to(tl.int32), (BLOCK_N // SEG, SEG)), axis=1) > 0
    seg = 2 * (seg0 + tl.arange(0, BLOCK_N // SEG))
    tl.store(stats_ptr + seg, s1, mask=seg_ok)
    tl.store(stats_ptr + seg + 1, s2, mask=seg_ok)


@triton.jit
def epilogue(acc, out_ptr, bias_ptr, out_row, out_col, mask, co_global, col_ok, HAS_BIAS: tl.constexpr,
             ACT: tl.constexpr, res_ptr=None, res_row=None, res_col=None, RESIDUAL: tl.constexpr = False,
             stats_ptr=None, seg0=0, STATS: tl.constexpr = False, SEG: tl.constexpr = 1):
    """out[row, col] = act(acc + bias[co_global[col]] (+ res[row, col] with RESIDUAL)) through the int64
    offsets out_row [BLOCK_M] + out_col [BLOCK_N], where mask [BLOCK_M, BLOCK_N].

    out_ptr: the output, any strides; bias_ptr: (C,) (unused without HAS_BIAS); col_ok [BLOCK_N] guards
    the bias load. RESIDUAL: res_ptr, a tensor of out's shape (any strides), is read at the int64 offsets
    res_row [BLOCK_M] + res_col [BLOCK_N] and added before the activation. STATS: ``tile_group_sums`` of
    the stored values into stats_ptr from segment seg0. The hooks' arguments are unused when they are off.
    """
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co_global, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:  # before the activation: ResNet's relu(conv + identity)
        acc += tl.load(res_ptr + res_row[:, None] + res_col[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _act(acc, ACT)
    tl.store(out_ptr + out_row[:, None] + out_col[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if STATS:
        tile_group_sums(y.to(out_ptr.dtype.element_ty), mask, col_ok, stats_ptr, seg0, SEG)


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share each column tile while it sits in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def store_w_rows(acc, out_ptr, bias_ptr, n, g, lh0, lw0, j0, CH, CW, OH, OW, OH0, OW0, COUT_G, SH, n_cols,
                 stride_on, stride_oc, stride_oh, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CROP: tl.constexpr,
                 SW: tl.constexpr, ROWS: tl.constexpr, W_TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The sub-pixel epilogue for a W-contiguous output (stride_ow == 1): out[n, co, OH0 + lh*SH + rh,
    OW0 + lw*SW + rw] = act(acc + bias[co]) as whole row segments.

    acc [ROWS*W_TILE cells, BLOCK_N columns in (rh, co, rw) order from column j0] holds cells
    [lh0, lh0 + ROWS) x [lw0, lw0 + W_TILE) of sample n, group g. out_ptr: (N, C, OH, OW) output with
    stride 1 along W; bias_ptr: (C,). Regrouped as [(rh, co), cell row, (cell, rw)], each (rh, co, cell
    row) is W_TILE*SW contiguous output pixels, so the stores are full-width vectors instead of one
    scattered element per lane.
    """
    RC: tl.constexpr = BLOCK_N // SW
    j = j0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * COUT_G + (j // SW) % COUT_G, mask=j < n_cols, other=0.0).to(tl.float32)[None, :]
    y = _act(acc, ACT).to(out_ptr.dtype.element_ty)
    y = tl.reshape(tl.permute(tl.reshape(y, (ROWS, W_TILE, RC, SW)), (2, 0, 1, 3)), (RC, ROWS, W_TILE * SW))
    rc = j0 // SW + tl.arange(0, RC)                  # (rh, co) pairs
    lh = lh0 + tl.arange(0, ROWS)                     # cell rows
    t = tl.arange(0, W_TILE * SW)                     # (cell, rw) along the output row
    oh = OH0 + lh[None, :] * SH + (rc // COUT_G)[:, None]
    ow = OW0 + lw0 * SW + t
    co = g * COUT_G + rc % COUT_G
    offs = (n.to(tl.int64) * stride_on + (co.to(tl.int64) * stride_oc)[:, None, None]
            + (oh.to(tl.int64) * stride_oh)[:, :, None] + ow[None, None, :])
    # Bounds along t are written as ranges of t, so that the mask stays constant over aligned runs of t and
    # the stores vectorise: cell lw0 + t // SW < CW, and (with CROP) 0 <= ow < OW.
    t_ok = t < (CW - lw0) * SW
    if CROP:  # padding, or a last cell reaching past the image
        t_ok = t_ok & (t >= -(OW0 + lw0 * SW)) & (t < OW - (OW0 + lw0 * SW))
    mask = (rc < n_cols // SW)[:, None, None] & (lh < CH)[None, :, None] & t_ok[None, None, :]
    if CROP:
        mask = mask & ((oh >= 0) & (oh < OH))[:, :, None]
    tl.store(out_ptr + offs, y, mask=mask)
