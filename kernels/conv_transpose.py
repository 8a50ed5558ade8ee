"""Triton kernels of the fused transposed convolution (spec: vlfast/reference/conv_transpose.py;
launchers: vlfast/ops/conv_transpose_triton.py; the shared implicit-GEMM core: kernels/igemm.py).

Per axis, output pixel o of a transposed convolution (stride s, padding p, dilation d) receives
x[i] * w[k] for every tap k with o = i*s - p + k*d, i.e. i = (o + p - k*d) / s when that divides.
Two forward kernels, both implicit GEMMs with float32 accumulation in ``tl.dot`` and a fused epilogue
(bias, activation, a store through any output strides):

- ``conv_transpose2d_subpixel_kernel`` (dilation 1, k a multiple of s: the U-Net up-conv, VAE k4 s2 p1,
  FCN's k = 2s):
  write each tap as k = r + t*s (phase r < s, t < T = ceil(k/s)). Then o = c*s + r - p with cell
  c = i + t, and y[c*s + r - p] = sum_t x[c - t] * w[r + t*s]: the whole layer is ONE GEMM
  A[(n, ch, cw), (th, tw, ci)] @ Wsp[(th, tw, ci), (rh, rw, co)] with A[(n, ch, cw), (th, tw, ci)] =
  x[n, ci, ch - th, cw - tw] (a T_h x T_w implicit-GEMM convolution of x) and Wsp[.., (rh, rw, co)] =
  w[ci, co, rh + th*s, rw + tw*s] (0 where that tap is past the kernel), whose epilogue scatters
  each row's s_h x s_w x Cout block to its cell of the output (depth-to-space), cropped by the
  padding. k == s, padding 0 is the case T = 1: one input pixel per cell, a plain GEMM. The columns
  run co-innermost for a channels_last output and rw-innermost for an NCHW one, so that
  neighbouring lanes store to neighbouring addresses. Wsp has zero entries where k is not a multiple
  of s (the Triton backward's dgrad masks them); the forward launcher sends those geometries to the
  phase kernel, as a padded zero tap times an inf input would make a NaN that PyTorch does not.
- ``conv_transpose2d_phase_kernel`` (dilation > 1, or k not a multiple of s): output pixels with the
  same (o + p) mod s form a phase; its taps are the k with k*d = (o + p) mod s (mod s), an arithmetic
  progression k0, k0 + dk, ... whose input row moves by -dk*d/s per tap. Each phase is an ordinary convolution
  over only its own taps (no multiply touches an inserted zero); one launch covers all s_h*s_w
  phases (grid axis 1; each program derives its phase's geometry from scalars, so nothing is
  copied to the device per call), and a phase without taps still gets bias + activation.

The GEMM machinery (input-tile loader, the K loop over taps x input-channel chunks, the epilogue,
the row-segment store, the program swizzle) is the implicit-GEMM core, kernels/igemm.py: each kernel
here decodes its rows and columns, points the core at its taps and weight, and stores.

The backward (dilation 1) has two more GEMMs against Wsp, at the end of this file: dgrad over the input
pixels and wgrad over the output cells. They use the core's swizzle and epilogue; their K loops are
their own, as their A tiles are not the core's [pixels, channels] input tiles (see there).

The host side (vlfast/ops/igemm.py) arranges the weight on every call (one copy kernel):
Wt[G, KH, KW, Cin/G, Cout/G] for the phase kernel (one [Cin/G, Cout/G] matrix per tap),
Wsp[G, TH*TW*Cin/G, SH*SW*Cout/G] for the sub-pixel kernel.
"""

import triton
import triton.language as tl

from .igemm import epilogue, k_loop, store_w_rows, swizzle


# N, H, W and SH are not specialised (on == 1 or divisibility by 16): that only multiplies compiles. Channel
# counts, strides, output sizes and cell ranges are: they decide which loads and stores vectorise.
@triton.jit(do_not_specialize=["N", "H", "W", "SH"])
def conv_transpose2d_subpixel_kernel(
    x_ptr,     # (N, G*CIN_G, H, W) input, any strides
    wsp_ptr,   # (G, TH*TW*CIN_G, SH*SW*COUT_G) pre-arranged weight, contiguous: rows (th, tw, ci); columns
               # (rh, rw, co), or (rh, co, rw) when RW_INNER; zero where rh + th*SH >= KH or rw + tw*SW >= KW
    bias_ptr,  # (G*COUT_G,) bias (or any pointer when HAS_BIAS is False)
    out_ptr,   # (N, G*COUT_G, OH, OW) output, any strides; only the blocks of cells [CH0, CH0+CH) x [CW0, CW0+CW)
    N, H, W, OH, OW, CH0, CW0, CH, CW, OH0, OW0, CIN_G, COUT_G, SH,  # OH0 = CH0*SH - PH, OW0 = CW0*SW - PW
    stride_xn, stride_xc, stride_xh, stride_xw, stride_on, stride_oc, stride_oh, stride_ow,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    SW: tl.constexpr, RW_INNER: tl.constexpr, W_TILE: tl.constexpr, W_ROWS_STORE: tl.constexpr,
    CROP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (M tiles x column tiles, G). Rows = output cells (n, ch, cw); columns j = (rh, rw, co) or (rh, co, rw).
    g = tl.program_id(1)
    n_cols = SH * SW * COUT_G
    num_n = tl.cdiv(n_cols, BLOCK_N)

    # Stage 1: decode the rows (cells, relative to (CH0, CW0)) and the columns (phase in the cell, channel).
    if W_TILE > 0:  # 2-D tiles within one sample: ROWS cell rows x W_TILE cells (W-contiguous x or out)
        ROWS: tl.constexpr = BLOCK_M // W_TILE
        tiles_h = tl.cdiv(CH, ROWS)
        tiles_w = tl.cdiv(CW, W_TILE)
        pid_m, pid_n = swizzle(tl.program_id(0), N * tiles_h * tiles_w, num_n, GROUP_M)
        n = pid_m // (tiles_h * tiles_w)
        lh0 = pid_m // tiles_w % tiles_h * ROWS
        lw0 = pid_m % tiles_w * W_TILE
        i = tl.arange(0, BLOCK_M)
        lh = lh0 + i // W_TILE
        lw = lw0 + i % W_TILE
        row_ok = (lh < CH) & (lw < CW)
    else:  # 1-D tiles over all N*CH*CW cells (channels_last x and out)
        pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(N * CH * CW, BLOCK_M), num_n, GROUP_M)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < N * CH * CW
        n = m // (CH * CW)
        lh = m % (CH * CW) // CW
        lw = m % CW
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = j < n_cols
    rh = j // (SW * COUT_G)
    if RW_INNER:  # W-contiguous output: the s pixels of a cell row, then the next cell's, are adjacent in memory
        rw = j % SW
        co = (j // SW) % COUT_G
    else:  # channel-contiguous output: co innermost
        co = j % COUT_G
        rw = (j // COUT_G) % SW

    # Stage 2: acc = A @ Wsp with A[(n, ch, cw), (th, tw, ci)] = x[n, ci, ch - th, cw - tw] (0 outside the
    # image): tap (th, tw) reads cell (ch - th, cw - tw) against Wsp's rows (th*TW + tw, ci).
    x_row = n.to(tl.int64) * stride_xn + (g * CIN_G).to(tl.int64) * stride_xc
    wsp = wsp_ptr + g.to(tl.int64) * (TH * TW * CIN_G) * n_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = k_loop(acc, x_ptr, wsp, x_row, CH0, CW0, lh, lw, row_ok, j, col_ok, TH * TW, TW, -1, -1, CIN_G, n_cols, H, W,
                 stride_xc, stride_xh, stride_xw, BLOCK_K, PRECISION, ONE_TAP=TH * TW == 1)

    # Stage 3: bias, activation, and each cell's block to out[n, co, OH0 + lh*SH + rh, OW0 + lw*SW + rw],
    # cropped to the image.
    if W_ROWS_STORE:
        store_w_rows(acc, out_ptr, bias_ptr, n, g, lh0, lw0, pid_n * BLOCK_N, CH, CW, OH, OW, OH0, OW0, COUT_G, SH,
                     n_cols, stride_on, stride_oc, stride_oh, HAS_BIAS, ACT, CROP, SW, ROWS, W_TILE, BLOCK_N)
    else:
        co_global = g * COUT_G + co
        oh0 = OH0 + lh * SH
        ow0 = OW0 + lw * SW
        out_row = n.to(tl.int64) * stride_on + oh0.to(tl.int64) * stride_oh + ow0.to(tl.int64) * stride_ow
        out_col = co_global.to(tl.int64) * stride_oc + rh.to(tl.int64) * stride_oh + rw.to(tl.int64) * stride_ow
        mask = row_ok[:, None] & col_ok[None, :]
        if CROP:
            oh = oh0[:, None] + rh[None, :]
            ow = ow0[:, None] + rw[None, :]
            mask = mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        epilogue(acc, out_ptr, bias_ptr, out_row, out_col, mask, co_global, col_ok, HAS_BIAS, ACT)


@triton.jit
def _phase_axis(r, O, S, P, D, K, G, INV, DK):
    """Along one axis, phase r < S (the output pixels o with (o + P) mod S == r): its first pixel o0, its
    pixel count, the input index of its first tap at o0, that tap k0 and the number of taps.

    The taps k are those with k*D = r (mod S): none unless G = gcd(D, S) divides r, else
    k0 = (r/G) * INV mod DK with INV the inverse of D/G modulo DK = S/G, then k0 + DK, k0 + 2*DK, ... < K.
    """
    o0 = ((r - P) % S + S) % S  # written so that C-style remainders of negatives don't matter
    count = (O - o0 + S - 1) // S
    k0 = ((r // G) * INV) % DK
    n_k = tl.where((r % G == 0) & (k0 < K), (K - k0 + DK - 1) // DK, 0)
    base = (o0 + P - k0 * D) // S  # exact whenever n_k > 0
    return o0, count, base, k0, n_k


@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "GH", "GW",
                                "INVH", "INVW", "DKH", "DKW", "DIH", "DIW", "num_m"])
def conv_transpose2d_phase_kernel(
    x_ptr,     # (N, G*CIN_G, H, W) input, any strides
    wt_ptr,    # (G, KH, KW, CIN_G, COUT_G) pre-arranged weight, contiguous
    bias_ptr,  # (G*COUT_G,) bias (or any pointer when HAS_BIAS is False)
    out_ptr,   # (N, G*COUT_G, OH, OW) output, any strides
    N, H, W, OH, OW, CIN_G, COUT_G, KH, KW, SH, SW, PH, PW, DH, DW,
    GH, GW, INVH, INVW, DKH, DKW, DIH, DIW, num_m,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_on, stride_oc, stride_oh, stride_ow,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (M tiles of the largest phase x Cout tiles, phase, G). Rows m = (n, th, tw) of the phase.
    phase = tl.program_id(1)
    g = tl.program_id(2)
    pid_m, pid_n = swizzle(tl.program_id(0), num_m, tl.cdiv(COUT_G, BLOCK_N), GROUP_M)
    oh0, th_n, ih_base, kh0, n_kh = _phase_axis(phase // SW, OH, SH, PH, DH, KH, GH, INVH, DKH)
    ow0, tw_n, iw_base, kw0, n_kw = _phase_axis(phase % SW, OW, SW, PW, DW, KW, GW, INVW, DKW)
    m_total = N * th_n * tw_n
    if pid_m * BLOCK_M >= m_total:  # this phase has fewer output pixels than the largest one
        return

    # Stage 1: decode rows (the phase's output pixels) and the Cout columns.
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < m_total
    per_n = th_n * tw_n
    n = m // per_n
    th = (m % per_n) // tw_n
    tw = m % tw_n
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT_G

    # Stage 2: implicit GEMM over this phase's taps x the group's input channels (a phase without
    # taps runs no iteration and gets bias + activation only).
    x_row = n.to(tl.int64) * stride_xn + (g * CIN_G).to(tl.int64) * stride_xc
    wt_g = wt_ptr + g.to(tl.int64) * KH * KW * CIN_G * COUT_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = k_loop(acc, x_ptr, wt_g, x_row, 0, 0, th + ih_base, tw + iw_base, row_ok, co, co_ok, n_kh * n_kw,
                 tl.maximum(n_kw, 1), DIH, DIW, CIN_G, COUT_G, H, W, stride_xc, stride_xh, stride_xw, BLOCK_K,
                 PRECISION, w_taps=(kh0, kw0, DKH, DKW, KW))

    # Stage 3: bias, activation, store to out[n, co, oh0 + th*SH, ow0 + tw*SW].
    co_global = g * COUT_G + co
    out_row = (n.to(tl.int64) * stride_on + (oh0 + th * SH).to(tl.int64) * stride_oh
               + (ow0 + tw * SW).to(tl.int64) * stride_ow)
    epilogue(acc, out_ptr, bias_ptr, out_row, co_global.to(tl.int64) * stride_oc, row_ok[:, None] & co_ok[None, :],
             co_global, co_ok, HAS_BIAS, ACT)


# ---------------------------------------------------------------- backward (dilation 1)
# In the sub-pixel form y[c*s + r - p] = sum_t x[c - t] * w[r + t*s] (cell c, phase r < s, tap t < T), so
#   dx[i] = sum_{t, r, co} dy[(i + t)*s + r - p, co] * w[ci, co, r + t*s]   (a GEMM over input pixels), and
#   dWsp[(t, ci), (r, co)] = sum_{n, c} x[c - t, ci] * dy[c*s + r - p, co]  (a GEMM over output cells),
# both against the forward's arranged weight Wsp; positions outside the image read as 0. dgrad's K runs
# over the (rw, co) of a phase row packed densely (a small Cout/G fills a K tile: a plain channel loop
# would double the steps at Cout/G = 3) and wgrad's over output cells, so their A tiles mix pixels and
# channels along both axes: each kernel gathers its own tiles.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "SH"])
def conv_transpose2d_dgrad_kernel(
    dy_ptr,    # (N, G*COUT_G, OH, OW) gradient of the output (after the activation's), any strides
    wsp_ptr,   # (G, TH*TW*CIN_G, SH*SW*COUT_G) the forward's arranged weight, columns (rh, rw, co)
    dx_ptr,    # (N, G*CIN_G, H, W) gradient of the input, any strides
    N, H, W, OH, OW, CIN_G, COUT_G, KH, KW, SH, PH, PW,
    stride_dn, stride_dc, stride_dh, stride_dw, stride_xn, stride_xc, stride_xh, stride_xw,
    PRECISION: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, SW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grid: (M tiles x Cin tiles, G). Rows m = input pixels (n, ih, iw); columns = input channels ci.
    g = tl.program_id(1)
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(N * H * W, BLOCK_M), tl.cdiv(CIN_G, BLOCK_N), GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < N * H * W
    n = m // (H * W)
    ih = m % (H * W) // W
    iw = m % W
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < CIN_G

    # Stage 1: acc = sum over (tap, phase row, chunk of (rw, co)) of dy at cell (ih + th, iw + tw) x Wsp^T.
    n_cols = SH * SW * COUT_G
    k_row = SW * COUT_G  # (rw, co) of one phase row of a cell
    chunks = tl.cdiv(k_row, BLOCK_K)
    dy_row = n.to(tl.int64) * stride_dn + (g * COUT_G).to(tl.int64) * stride_dc
    wsp = wsp_ptr + g.to(tl.int64) * (TH * TW * CIN_G) * n_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, TH * TW * SH * chunks):
        q = it // chunks
        kk = (it - q * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        kk_ok = kk < k_row
        rh = q % SH
        tap = q // SH
        oh = (ih + tap // TW) * SH + rh - PH
        ow = ((iw + tap % TW) * SW - PW)[:, None] + (kk // COUT_G)[None, :]
        # Where Wsp holds a padded zero tap, dy is read as 0 too (0 * inf would be a NaN that PyTorch's dx does
        # not have): kernel row rh + th*SH = oh + PH - ih*SH, column rw + tw*SW = kk // COUT_G + tw*SW.
        real_h = (oh >= 0) & (oh < OH) & (oh + PH - ih * SH < KH)
        real_w = kk_ok & (kk // COUT_G + tap % TW * SW < KW)
        ok = (row_ok & real_h)[:, None] & real_w[None, :] & (ow >= 0) & (ow < OW)
        a = tl.load(dy_ptr + (dy_row + oh.to(tl.int64) * stride_dh)[:, None] + ow * stride_dw
                    + ((kk % COUT_G) * stride_dc)[None, :], mask=ok, other=0.0)
        b = tl.load(wsp + ((tap * CIN_G + ci) * n_cols)[None, :] + (rh * k_row + kk)[:, None],
                    mask=kk_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Stage 2: store dx[n, g*CIN_G + ci, ih, iw].
    dx_row = n.to(tl.int64) * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
    epilogue(acc, dx_ptr, None, dx_row, (g * CIN_G + ci).to(tl.int64) * stride_xc, row_ok[:, None] & ci_ok[None, :],
             None, None, False, 0)


@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "CH", "CW", "SH", "cells_per_split"])
def conv_transpose2d_wgrad_kernel(
    x_ptr,     # (N, G*CIN_G, H, W) input, any strides
    dy_ptr,    # (N, G*COUT_G, OH, OW) gradient of the output (after the activation's), any strides
    part_ptr,  # (SPLIT, G, TH*TW*CIN_G, SH*SW*COUT_G) float32: one partial dWsp per split of the cells
    N, H, W, OH, OW, CH0, CW0, CH, CW, CIN_G, COUT_G, SH, PH, PW, cells_per_split,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_dn, stride_dc, stride_dh, stride_dw,
    PRECISION: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, SW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (M tiles x column tiles, split, G). Rows = (th, tw, ci); columns = (rh, rw, co); K = cells.
    g = tl.program_id(2)
    split = tl.program_id(1)
    n_rows = TH * TW * CIN_G
    n_cols = SH * SW * COUT_G
    num_n = tl.cdiv(n_cols, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < n_rows
    tap = r // CIN_G
    ci = r % CIN_G
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < n_cols
    rh = j // (SW * COUT_G)
    rw = (j // COUT_G) % SW
    co = j % COUT_G

    # Stage 1: acc = sum over this split's cells k of x[c_k - tap, ci] (rows) x dy[cell block of c_k] (columns).
    total = N * CH * CW
    k_lo = split * cells_per_split
    k_hi = tl.minimum(k_lo + cells_per_split, total)
    x_col = (g * CIN_G + ci).to(tl.int64) * stride_xc
    dy_col = (g * COUT_G + co).to(tl.int64) * stride_dc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        n = k // (CH * CW)
        ch = CH0 + k % (CH * CW) // CW
        cw = CW0 + k % CW
        ih = ch[None, :] - (tap // TW)[:, None]
        iw = cw[None, :] - (tap % TW)[:, None]
        a_ok = r_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (n.to(tl.int64) * stride_xn)[None, :] + x_col[:, None] + ih * stride_xh + iw * stride_xw,
                    mask=a_ok, other=0.0)
        oh = (ch * SH - PH)[:, None] + rh[None, :]
        ow = (cw * SW - PW)[:, None] + rw[None, :]
        b_ok = k_ok[:, None] & j_ok[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        b = tl.load(dy_ptr + (n.to(tl.int64) * stride_dn)[:, None] + dy_col[None, :] + oh * stride_dh + ow * stride_dw,
                    mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Stage 2: this split's partial, float32 (summed over the splits in a fixed order by the launcher).
    part_row = ((split * tl.num_programs(2) + g).to(tl.int64) * n_rows + r) * n_cols
    epilogue(acc, part_ptr, None, part_row, j, r_ok[:, None] & j_ok[None, :], None, None, False, 0)
