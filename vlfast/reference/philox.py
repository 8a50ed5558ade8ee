"""Counter-based Gaussian noise, the stream every vlfast backend draws.

Every backend (Triton, CUDA, C++, this reference) draws the same numbers for
the same ``(seed, offset)``: the integers are bit-identical, the floats agree to
a few ulp (each backend uses its own ``log``/``sin``/``cos``).

The element at position ``r`` (in memory order, inside sample ``n``) of a
tensor drawn with ``(seed, offset)`` is lane ``r % 4`` of

    Philox4x32-10(key=(seed mod 2**32, seed >> 32),
                  counter=(r // 4, n, offset mod 2**32, offset >> 32))

mapped to a uniform ``u = (i if i >= 0 else ~i) * 2**-31`` (``i`` the word read
as int32, as Triton's ``uint_to_uniform_float`` does) and then to normals by
Box-Muller on the lane pairs (0, 1) and (2, 3):

    z0 = sqrt(-2 log max(u0, 1e-7)) * cos(2 pi u1)
    z1 = sqrt(-2 log max(u0, 1e-7)) * sin(2 pi u1)

This is Triton's ``tl.randn4x`` with the sample index and the offset in the
upper counter words, so that successive calls (new ``offset``) and samples
(new ``n``) get disjoint streams.
"""

import math

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
N_ROUNDS = 10


def _mul32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of a * b, for a constant a < 2**32 and int64 b < 2**32."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo                      # < 2**48
    t = a * b_hi + (p_lo >> 16)          # a * b == t * 2**16 + (p_lo & 0xffff)
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 on int64 tensors holding uint32 words; returns four such tensors."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul32(ROUND_B, c2)
        hi_a, lo_a = _mul32(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 in [0, 1], as Triton maps them."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def randn_philox(seed: int, offset, batch: int, per_sample: int, device=None) -> torch.Tensor:
    """Gaussian noise of shape (batch, per_sample), float32, in the stream described above.

    ``offset`` is an int or an int64 tensor of one element (read on its device,
    so this stays free of host synchronisation).
    """
    r = torch.arange(per_sample, device=device, dtype=torch.int64)
    n = torch.arange(batch, device=device, dtype=torch.int64)
    q = (r // 4)[None, :].expand(batch, per_sample)
    nn = n[:, None].expand(batch, per_sample)
    if isinstance(offset, torch.Tensor):
        off = offset.to(device=device, dtype=torch.int64).reshape(())
    else:
        off = torch.full((), int(offset), device=device, dtype=torch.int64)  # a fill: no host-to-device copy
    off_lo = (off & MASK32).expand(batch, per_sample)
    off_hi = ((off >> 32) & MASK32).expand(batch, per_sample)
    words = philox4x32(int(seed), q & MASK32, nn & MASK32, off_lo, off_hi)
    u = [uint_to_uniform(w) for w in words]
    lane = (r % 4)[None, :]
    r01 = torch.sqrt(-2.0 * torch.log(torch.clamp_min(u[0], 1e-7)))
    r23 = torch.sqrt(-2.0 * torch.log(torch.clamp_min(u[2], 1e-7)))
    two_pi = 2.0 * math.pi
    z = torch.where(lane == 0, r01 * torch.cos(two_pi * u[1]),
        torch.where(lane == 1, r01 * torch.sin(two_pi * u[1]),
        torch.where(lane == 2, r23 * torch.cos(two_pi * u[3]), r23 * torch.sin(two_pi * u[3]))))
    return z
