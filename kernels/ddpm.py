"""Triton kernel of the fused DDPM/DDIM update (spec: vlfast/reference/ddpm.py).

One program handles BLOCK consecutive elements of one sample: it reads that
sample's coefficient row once, draws its noise with one Philox call per four
elements, and writes the update (and optionally x0 and the noise) in one pass.
"""

import triton
import triton.language as tl

# Columns of a coefficient row (vlfast.reference.ddpm).
A_X = tl.constexpr(0)
A_M = tl.constexpr(1)
K_0 = tl.constexpr(2)
K_X = tl.constexpr(3)
K_M = tl.constexpr(4)
SIGMA = tl.constexpr(5)
LOG_MIN = tl.constexpr(6)
LOG_MAX = tl.constexpr(7)


@triton.jit
def _uniform(i):
    """uint32 words -> float32 in [0, 1], as tl.uint_to_uniform_float maps them."""
    s = i.to(tl.int32, bitcast=True)
    s = tl.where(s < 0, ~s, s)
    return s.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _randn_block(seed, n, offset, pid, BLOCK: tl.constexpr):
    """BLOCK normals for elements pid*BLOCK .. of sample n (stream of vlfast.reference.philox)."""
    q = (pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = tl.zeros_like(q)
    off = offset.to(tl.int64)
    c1 = zero + n.to(tl.uint32)
    c2 = zero + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    i0, i1, i2, i3 = tl.philox(seed, q, c1, c2, c3)
    # Box-Muller on the lane pairs (0, 1) and (2, 3).
    r01 = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(i0), 1e-7)))
    r23 = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(i2), 1e-7)))
    th1 = 6.283185307179586 * _uniform(i1)
    th3 = 6.283185307179586 * _uniform(i3)
    z0, z1 = r01 * tl.cos(th1), r01 * tl.sin(th1)
    z2, z3 = r23 * tl.cos(th3), r23 * tl.sin(th3)
    # Lane k of counter q is element 4q + k.
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit(do_not_specialize=["timestep", "seed", "offset"])
def ddpm_step_kernel(
    x_ptr,       # (B, P) sample, dense, P = per_sample
    m_ptr,       # (B, P) model output, batch stride stride_mn
    v_ptr,       # (B, P) predicted variance, batch stride stride_vn
    z_ptr,       # (B, P) given noise, batch stride stride_zn
    out_ptr,     # (B, P) previous sample, like x
    x0_ptr,      # (B, P) predicted original sample, like x
    zout_ptr,    # (B, P) noise used, like x
    coef_ptr,    # (R, 8) float32 coefficient rows
    t_ptr,       # (1,) or (B,) int64 timesteps, step stride_t
    thresh_ptr,  # (B,) float32 dynamic-threshold scales
    state_ptr,   # (2,) int64 {counter, arrivals}
    P, stride_mn, stride_vn, stride_zn, stride_t, n_rows, timestep, clip, seed, offset,
    HAS_M: tl.constexpr, VAR_MODE: tl.constexpr, NOISE: tl.constexpr, HAS_STATE: tl.constexpr,
    T_FROM_PTR: tl.constexpr, CLIP: tl.constexpr, THRESH: tl.constexpr,
    WRITE_X0: tl.constexpr, WRITE_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    pid = tl.program_id(1)
    nl = n.to(tl.int64)
    # Stage 1: this sample's coefficient row; NaN for a timestep out of range.
    if T_FROM_PTR:
        t = tl.load(t_ptr + nl * stride_t)
    else:
        t = timestep
    valid = (t >= 0) & (t < n_rows)
    row = coef_ptr + tl.where(valid, t, 0) * 8
    nan = float("nan")
    a_x = tl.where(valid, tl.load(row + A_X), nan)
    a_m = tl.where(valid, tl.load(row + A_M), nan)
    k_0 = tl.where(valid, tl.load(row + K_0), nan)
    k_x = tl.where(valid, tl.load(row + K_X), nan)
    k_m = tl.where(valid, tl.load(row + K_M), nan)
    sig = tl.where(valid, tl.load(row + SIGMA), nan)
    if HAS_STATE:
        counter = tl.load(state_ptr)
        offset = offset.to(tl.int64) + counter

    # Stage 2: load the block.
    r = pid * BLOCK + tl.arange(0, BLOCK)
    mask = r < P
    x = tl.load(x_ptr + nl * P + r, mask=mask, other=0.0).to(tl.float32)
    if HAS_M:
        m = tl.load(m_ptr + nl * stride_mn + r, mask=mask, other=0.0).to(tl.float32)
    else:
        m = tl.zeros_like(x)

    # Stage 3: predicted x0, clipped or thresholded.
    x0 = a_x * x + a_m * m
    if THRESH:
        s = tl.load(thresh_ptr + nl)
        x0 = tl.clamp(x0, -s, s, propagate_nan=tl.PropagateNan.ALL) / s
    elif CLIP:
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    prev = k_0 * x0 + k_x * x + k_m * m

    # Stage 4: noise, scaled by a fixed or learned sigma.
    if NOISE != 0:
        if NOISE == 1:
            z = tl.load(z_ptr + nl * stride_zn + r, mask=mask, other=0.0).to(tl.float32)
        else:
            z = _randn_block(seed, n, offset, pid, BLOCK)
        if VAR_MODE == 0:
            sigma = sig
        else:
            v = tl.load(v_ptr + nl * stride_vn + r, mask=mask, other=0.0).to(tl.float32)
            if VAR_MODE == 1:
                learned = tl.sqrt(v)
            else:
                lmin = tl.load(row + LOG_MIN)
                lmax = tl.load(row + LOG_MAX)
                frac = (v + 1.0) * 0.5
                learned = tl.exp(0.5 * (frac * lmax + (1.0 - frac) * lmin))
            sigma = tl.where(sig != 0.0, sig * learned, 0.0)
        prev += sigma * z
        if WRITE_NOISE:
            tl.store(zout_ptr + nl * P + r, z.to(zout_ptr.dtype.element_ty), mask=mask)

    # Stage 5: write.
    tl.store(out_ptr + nl * P + r, prev.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + nl * P + r, x0.to(x0_ptr.dtype.element_ty), mask=mask)

    # Stage 6: the last program to finish advances the device counter (graph replays draw fresh noise).
    if HAS_STATE:
        tl.debug_barrier()
        arrived = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel")
        if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
            tl.store(state_ptr, counter + 1)
            tl.store(state_ptr + 1, 0)
