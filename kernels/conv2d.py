"""Triton kernels of the fused (dilated, strided, grouped) convolution (launchers: vlfast/ops/conv2d_triton.py;
the shared implicit-GEMM core: kernels/igemm.py).

Per axis, output pixel o reads input pixel i = o*s - p + k*d for tap k < K (0 outside the image). Three kernels:

- ``conv2d_igemm_kernel``: the convolution as the core's implicit GEMM (see kernels/igemm.py): rows = output
  pixels (n, oh, ow), columns = the group's Cout/G output channels, K = taps x Cin/G against the weight
  arranged [G, KH, KW, Cin/G, Cout/G]. Each program first narrows the taps to those whose input rows and
  columns reach the image for some row of its tile (an interval per axis, from the tile's smallest and
  largest oh*s - p and ow*s - p), so taps entirely in the padding for the whole tile (the border tiles of a
  dilated conv) cost no K step; it passes that window to ``k_loop`` in its "phase taps" form (tap
  (kh_lo + jh, kw_lo + jw) of the [KH, KW] kernel). The epilogue adds bias and the residual, applies the
  activation and stores through any output strides;
- ``conv2d_depthwise_kernel``: groups == Cin, Cout = Cin*MULT. A GEMM would spend a whole K tile on one
  channel, so this is direct: a [pixels, output channels] tile, a loop over the same tap window, one
  multiply-add per tap in float32, the same epilogue;
- ``conv2d_wgrad_kernel``: dW[g, (kh, kw, ci), co] = sum over output pixels of x[.., ci, i(oh, kh), i(ow, kw)] *
  dy[.., co, oh, ow], a GEMM whose K runs over the N*OH*OW output pixels, split into float32 partials that
  the launcher adds up in a fixed order (deterministic, no atomics).

Row tiles (``_rows``) are BLOCK_M consecutive pixels of all N*OH*OW (channels_last), or, where W is the
contiguous dimension of the output (or of an input read in place), ROWS x W_TILE blocks of one sample, so that
runs along W store (and load) as vectors. The input gradient is a transposed convolution of dy
(vlfast/ops/conv_transpose_triton.py's kernels).
"""

import triton
import triton.language as tl

from .igemm import epilogue, k_loop, swizzle


@triton.jit
def _tap_window(lo, hi, size, D, K):
    """Along one axis: the taps k whose input i = o + k*D (o the tile's first-tap input index, lo <= o <= hi over
    its valid rows) lands in [0, size) for some row: [k_lo, k_lo + count), a superset of the taps any row needs
    (empty when no row reaches the image; lo = size, hi = -1 for a tile without valid rows)."""
    k_lo = tl.where(hi >= 0, 0, (D - 1 - hi) // D)  # smallest k with hi + k*D >= 0 (numerator > 0 when used)
    k_hi = tl.where(size - 1 - lo >= 0, tl.minimum(K, (size - 1 - lo) // D + 1), 0)
    return k_lo, tl.maximum(k_hi - k_lo, 0)


@triton.jit
def _rows(pid_m, N, OH, OW, BLOCK_M: tl.constexpr, W_TILE: tl.constexpr):
    """Row tile pid_m's output pixels: (n, oh, ow, row_ok), n a scalar with 2-D tiles. W_TILE > 0: ROWS x W_TILE
    blocks of one sample (a W-contiguous output or input: runs of W_TILE pixels are contiguous in memory, so the
    stores and loads vectorise); W_TILE == 0: BLOCK_M consecutive pixels of all N*OH*OW."""
    i = tl.arange(0, BLOCK_M)
    if W_TILE > 0:
        ROWS: tl.constexpr = BLOCK_M // W_TILE
        tiles_h = tl.cdiv(OH, ROWS)
        tiles_w = tl.cdiv(OW, W_TILE)
        n = pid_m // (tiles_h * tiles_w)
        oh = pid_m // tiles_w % tiles_h * ROWS + i // W_TILE
        ow = pid_m % tiles_w * W_TILE + i % W_TILE
        row_ok = (oh < OH) & (ow < OW)
    else:
        m = pid_m * BLOCK_M + i
        row_ok = m < N * OH * OW
        n = m // (OH * OW)
        oh = m % (OH * OW) // OW
        ow = m % OW
    return n, oh, ow, row_ok


@triton.jit
def num_row_tiles(N, OH, OW, BLOCK_M: tl.constexpr, W_TILE: tl.constexpr):
    """How many row tiles ``_rows`` decodes (the launcher's grid uses the same count)."""
    if W_TILE > 0:
        return N * tl.cdiv(OH, BLOCK_M // W_TILE) * tl.cdiv(OW, W_TILE)
    return tl.cdiv(N * OH * OW, BLOCK_M)


# N, H and W are not specialised (on == 1 or divisibility by 16): that only multiplies compiles. Channel
# counts, strides and output sizes are: they decide which loads and stores vectorise (an OW divisible by 16
# lets a 2-D tile's row-bound mask stay constant over vector runs).
@triton.jit(do_not_specialize=["N", "H", "W"])
def conv2d_igemm_kernel(
    x_ptr,     # (N, G*CIN_G, H, W) input, any strides
    w_ptr,     # (G, KH, KW, CIN_G, COUT_G) pre-arranged weight, contiguous
    bias_ptr,  # (G*COUT_G,) bias, contiguous (or any pointer when HAS_BIAS is False)
    res_ptr,   # (N, G*COUT_G, OH, OW) residual, any strides (or any pointer when RESIDUAL is False)
    out_ptr,   # (N, G*COUT_G, OH, OW) output, any strides
    N, H, W, OH, OW, CIN_G, COUT_G, KH, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_rn, stride_rc, stride_rh, stride_rw,
    stride_on, stride_oc, stride_oh, stride_ow,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
    ONE_TAP: tl.constexpr, W_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (M tiles x Cout/G tiles, G). Rows m = output pixels (n, oh, ow); columns = the group's output channels.
    g = tl.program_id(1)
    pid_m, pid_n = swizzle(tl.program_id(0), num_row_tiles(N, OH, OW, BLOCK_M, W_TILE), tl.cdiv(COUT_G, BLOCK_N),
                           GROUP_M)

    # Stage 1: decode the rows and columns; each row's first-tap input pixel (oh*SH - PH, ow*SW - PW).
    n, oh, ow, row_ok = _rows(pid_m, N, OH, OW, BLOCK_M, W_TILE)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT_G
    ih = oh * SH - PH
    iw = ow * SW - PW

    # Stage 2: the taps that reach the image for some row of the tile (the rest read padding only).
    kh_lo, n_kh = _tap_window(tl.min(tl.where(row_ok, ih, H)), tl.max(tl.where(row_ok, ih, -1)), H, DH, KH)
    kw_lo, n_kw = _tap_window(tl.min(tl.where(row_ok, iw, W)), tl.max(tl.where(row_ok, iw, -1)), W, DW, KW)

    # Stage 3: acc = implicit GEMM over those taps x the group's input channels.
    x_row = n.to(tl.int64) * stride_xn + (g * CIN_G).to(tl.int64) * stride_xc
    w_g = w_ptr + g.to(tl.int64) * KH * KW * CIN_G * COUT_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = k_loop(acc, x_ptr, w_g, x_row, kh_lo * DH, kw_lo * DW, ih, iw, row_ok, co, co_ok, n_kh * n_kw,
                 tl.maximum(n_kw, 1), DH, DW, CIN_G, COUT_G, H, W, stride_xc, stride_xh, stride_xw, BLOCK_K,
                 PRECISION, ONE_TAP=ONE_TAP, w_taps=(kh_lo, kw_lo, 1, 1, KW))

    # Stage 4: bias, residual, activation; store to out[n, g*COUT_G + co, oh, ow].
    co_global = g * COUT_G + co
    out_row = n.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
    res_row = n.to(tl.int64) * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
    epilogue(acc, out_ptr, bias_ptr, out_row, co_global.to(tl.int64) * stride_oc, row_ok[:, None] & co_ok[None, :],
             co_global, co_ok, HAS_BIAS, ACT, res_ptr, res_row, co_global.to(tl.int64) * stride_rc, RESIDUAL)


@triton.jit(do_not_specialize=["N", "H", "W"])
def conv2d_depthwise_kernel(
    x_ptr,     # (N, C, H, W) input, any strides
    w_ptr,     # (KH*KW, C*MULT) pre-arranged weight, contiguous: row kh*KW + kw holds every output channel's tap
    bias_ptr,  # (C*MULT,) bias, contiguous (or any pointer when HAS_BIAS is False)
    res_ptr,   # (N, C*MULT, OH, OW) residual, any strides (or any pointer when RESIDUAL is False)
    out_ptr,   # (N, C*MULT, OH, OW) output, any strides
    N, H, W, OH, OW, COUT, MULT, KH, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_rn, stride_rc, stride_rh, stride_rw,
    stride_on, stride_oc, stride_oh, stride_ow,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, W_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid: (M tiles, output-channel tiles). Output channel co reads input channel co // MULT.
    n, oh, ow, row_ok = _rows(tl.program_id(0), N, OH, OW, BLOCK_M, W_TILE)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    co_ok = co < COUT
    ih = oh * SH - PH
    iw = ow * SW - PW

    # Stage 1: the tile's tap window, as in conv2d_igemm_kernel.
    kh_lo, n_kh = _tap_window(tl.min(tl.where(row_ok, ih, H)), tl.max(tl.where(row_ok, ih, -1)), H, DH, KH)
    kw_lo, n_kw = _tap_window(tl.min(tl.where(row_ok, iw, W)), tl.max(tl.where(row_ok, iw, -1)), W, DW, KW)

    # Stage 2: acc[m, co] = sum over the taps of x[n, co // MULT, ih + kh*DH, iw + kw*DW] * w[kh, kw, co], float32.
    x_row = n.to(tl.int64) * stride_xn + tl.zeros((BLOCK_M,), dtype=tl.int64)  # [BLOCK_M] also where n is a scalar
    x_base = x_row[:, None] + ((co // MULT).to(tl.int64) * stride_xc)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in range(kh_lo, kh_lo + n_kh):
        ih_k = ih + kh * DH
        h_ok = row_ok & (ih_k >= 0) & (ih_k < H)
        for kw in range(kw_lo, kw_lo + n_kw):
            iw_k = iw + kw * DW
            ok = h_ok & (iw_k >= 0) & (iw_k < W)
            xv = tl.load(x_ptr + (x_base + (ih_k * stride_xh + iw_k * stride_xw)[:, None]),
                         mask=ok[:, None] & co_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * KW + kw) * COUT + co, mask=co_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    # Stage 3: bias, residual, activation; store to out[n, co, oh, ow].
    out_row = n.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
    res_row = n.to(tl.int64) * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
    epilogue(acc, out_ptr, bias_ptr, out_row, co.to(tl.int64) * stride_oc, row_ok[:, None] & co_ok[None, :], co,
             co_ok, HAS_BIAS, ACT, res_ptr, res_row, co.to(tl.int64) * stride_rc, RESIDUAL)


@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "pix_per_split"])
def conv2d_wgrad_kernel(
    x_ptr,     # (N, G*CIN_G, H, W) input, any strides
    dy_ptr,    # (N, G*COUT_G, OH, OW) gradient of the pre-activation output, any strides
    part_ptr,  # (SPLIT, G, KH*KW*CIN_G, COUT_G) float32: one partial dW per split of the output pixels
    N, H, W, OH, OW, CIN_G, COUT_G, KH, KW, SH, SW, PH, PW, DH, DW, pix_per_split,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_dn, stride_dc, stride_dh, stride_dw,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (M tiles x column tiles, split, G). Rows r = (kh, kw, ci); columns = co; K = output pixels.
    g = tl.program_id(2)
    split = tl.program_id(1)
    n_rows = KH * KW * CIN_G
    num_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < n_rows
    tap = r // CIN_G
    ci = r % CIN_G
    off_h = (tap // KW) * DH - PH  # input offset of the row's tap, padding included
    off_w = (tap % KW) * DW - PW
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT_G

    # Stage 1: acc = sum over this split's output pixels k of x[n_k, ci, oh_k*SH + off_h, ow_k*SW + off_w] (rows)
    # x dy[n_k, co, oh_k, ow_k] (columns).
    total = N * OH * OW
    k_lo = split * pix_per_split
    k_hi = tl.minimum(k_lo + pix_per_split, total)
    x_col = (g * CIN_G + ci).to(tl.int64) * stride_xc
    dy_col = (g * COUT_G + co).to(tl.int64) * stride_dc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        n = k // (OH * OW)
        oh = k % (OH * OW) // OW
        ow = k % OW
        ih = (oh * SH)[None, :] + off_h[:, None]
        iw = (ow * SW)[None, :] + off_w[:, None]
        a_ok = r_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (n.to(tl.int64) * stride_xn)[None, :] + x_col[:, None] + ih * stride_xh + iw * stride_xw,
                    mask=a_ok, other=0.0)
        dy_row = n.to(tl.int64) * stride_dn + oh * stride_dh + ow * stride_dw
        b = tl.load(dy_ptr + dy_row[:, None] + dy_col[None, :], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Stage 2: this split's partial, float32 (summed over the splits in a fixed order by the launcher).
    part_row = ((split * tl.num_programs(2) + g).to(tl.int64) * n_rows + r) * COUT_G
    epilogue(acc, part_ptr, None, part_row, co.to(tl.int64), r_ok[:, None] & co_ok[None, :], None, None, False, 0)
