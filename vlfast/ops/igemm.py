"""Host side of the implicit-GEMM convolution kernels (the core: vlfast/kernels/igemm.py): the tile rules,
the TF32 rule and the weight arrangements, shared by the launchers of the convolution ops
(vlfast/ops/conv_transpose_triton.py, vlfast/ops/conv2d_triton.py).

Tiles are chosen from the GEMM's shape (M rows, N columns, K = taps x Cin/G) and dtype: one small config
below :data:`SMALL_MACS`, else :func:`tiles`; under Triton's interpreter one small shape
(:func:`interpreter_tiles`). A weight is arranged on every call (:func:`arranged_weight`,
:func:`conv2d_weight`: one copy kernel), never cached: no key on a tensor (id, data pointer, version
counter) sees every way PyTorch users write parameters (``p.data.copy_``, ``torch._foreach_mul_`` on
``p.data``, as EMA copies do, leave the version as it was), inference tensors have no version counter,
and a shared cache needs a lock.
"""

import torch
from torch import Tensor

from .. import backends
from . import _overrides
from ._common import cdiv, num_sms, pow2

# Problems below this many multiply-adds share one small tile config: one compile serves them all.
SMALL_MACS = 1 << 24
SMALL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, pow2(n)))


# torch >= 2.9 has the per-backend, per-op fp32_precision settings; reading the legacy allow_tf32 after
# they have been set differently for cuDNN's conv and RNN raises there.
_FP32_PRECISION = hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def cudnn_conv_tf32() -> bool:
    """Whether PyTorch's cuDNN convolutions may use TF32 now: ``torch.backends.cudnn.conv.fp32_precision``
    where torch has it ("none" inherits from ``torch.backends.cudnn.fp32_precision``, then from
    ``torch.backends.fp32_precision``; "none" throughout is IEEE), else ``torch.backends.cudnn.allow_tf32``."""
    if _FP32_PRECISION:
        for scope in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
            setting = scope.fp32_precision
            if setting != "none":
                return setting == "tf32"
        return False
    return torch.backends.cudnn.allow_tf32


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's input_precision now: TF32 for float32 only where PyTorch's convolutions may use it (the
    torch setting is read for float32 CUDA tensors only)."""
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit inputs
    return "tf32" if device.type == "cuda" and cudnn_conv_tf32() else "ieee"


def precision_rule(dtype: torch.dtype, device: torch.device):
    """For a plan: a function of no arguments giving :func:`precision` at each call. Only float32 on CUDA
    reads the torch setting each time (it may change between calls); other inputs get a constant."""
    if dtype == torch.float32 and device.type == "cuda":
        return lambda: precision(dtype, device)
    fixed = precision(dtype, device)
    return lambda: fixed


def tuned(cfg: dict, cin_g: int) -> dict:
    """``cfg`` with the ``igemm_tiles`` knob's values in place of the rule's (a tuning table's tiles for the
    call, or a probe's), BLOCK_K no longer than the power of two at or above Cin/G (at least 16)."""
    tiles = _overrides.get("igemm_tiles")
    if not tiles:
        return cfg
    cfg = {**cfg, **tiles}
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], clamp_pow2(cin_g, 16, 256))
    return cfg


def subpixel_config(m: int, n_cols: int, k: int, cin_g: int, dtype: torch.dtype, wide: bool = True) -> dict:
    """Tiles of conv_transpose2d_subpixel_kernel: M = N*cells rows, n_cols = s_h*s_w*Cout/G columns,
    K = taps*Cin/G (chunks of at most Cin/G: a K tile never straddles two taps). ``wide`` allows
    256-column tiles: only for one tap and no crop, with a channel-contiguous or row-segment store
    (compiled for sm_90 with Triton 3.6, 2026-11-26: 198-242 registers and no spills there; with two
    taps, a crop or the scattered W-contiguous store they spill, where 128-column tiles do not). The
    ``igemm_tiles`` knob replaces the rule's tiles (:func:`tuned`)."""
    return tuned(_subpixel_rule(m, n_cols, k, cin_g, dtype, wide), cin_g)


def _subpixel_rule(m: int, n_cols: int, k: int, cin_g: int, dtype: torch.dtype, wide: bool) -> dict:
    if backends.interpret_mode():
        return interpreter_tiles(m, n_cols)
    if m * n_cols * k < SMALL_MACS:
        return dict(SMALL)
    if wide and dtype != torch.float32 and m >= 4096 and n_cols >= 256 and cin_g >= 256:
        # The best of the plain-pointer configs on the U-Net up-conv's GEMM (8192x2048x1024) and a 3x3 conv's
        # (32768x256x2304) in the shared H100 Triton probe: 538 and 453 TF/s against 498-508 and 420 for 128x128.
        # Not below K = 256: a short K loop leaves one 256-column tile an SM mostly storing (unmeasured).
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return tiles(m, 128 if n_cols >= 128 else clamp_pow2(n_cols, 16, 64), cin_g, dtype)


def phase_config(m: int, cout_g: int, cin_g: int, dtype: torch.dtype) -> dict:
    """Tiles of conv_transpose2d_phase_kernel (and of any GEMM whose columns are Cout/G output channels):
    M = N*pixels rows, N = Cout/G, K = taps x Cin/G. The ``igemm_tiles`` knob replaces the rule's tiles
    (:func:`tuned`)."""
    if backends.interpret_mode():
        cfg = interpreter_tiles(m, cout_g)
    elif m * cout_g * cin_g < SMALL_MACS:
        cfg = dict(SMALL)
    else:
        cfg = tiles(m, clamp_pow2(cout_g, 16, 128), cin_g, dtype)
    return tuned(cfg, cin_g)


def backward_config(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Tiles of the transposed convolution's two backward GEMMs: M rows, N columns, K the reduction (no
    grouped order: GROUP_M is the dgrad launcher's)."""
    cfg = interpreter_tiles(m, n) if backends.interpret_mode() else tiles(m, clamp_pow2(n, 16, 128), k, dtype)
    del cfg["GROUP_M"]
    return cfg


def tiles(m: int, block_n: int, k_chunk: int, dtype: torch.dtype) -> dict:
    """The tile rule the GEMMs share: 128 rows from 4096 on; K chunks of up to 32 (fp32) or 64 (16-bit)
    elements, never longer than ``k_chunk``; 8 warps for 128 columns; more pipeline stages in 16-bit."""
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=128 if m >= 4096 else 64, BLOCK_N=block_n, BLOCK_K=clamp_pow2(k_chunk, 16, 32 if fp32 else 64),
                GROUP_M=8, num_warps=8 if block_n == 128 else 4, num_stages=3 if fp32 else 4)


def interpreter_tiles(m: int, n: int) -> dict:
    """One small tile shape under the interpreter (CPU tests): few compiles, quick numpy."""
    return dict(BLOCK_M=clamp_pow2(m, 16, 64), BLOCK_N=clamp_pow2(n, 16, 32), BLOCK_K=16, GROUP_M=4, num_warps=4,
                num_stages=1)


def arranged_weight(weight: Tensor, groups: int, order: str, stride=(1, 1)) -> Tensor:
    """The weight arranged for a kernel, a new contiguous tensor (made on every call: one copy kernel, a
    zero fill more for a sub-pixel arrangement with padded taps).

    weight (Cin, Cout/G, KH, KW). ``order``: "taps" -> (G, KH, KW, Cin/G, Cout/G), one matrix per tap
    (phase kernel); "subpixel_co" / "subpixel_rw" -> (G, TH*TW*Cin/G, SH*SW*Cout/G) with rows
    (th, tw, ci) and columns (rh, rw, co) / (rh, co, rw), entry w[ci, co, rh + th*SH, rw + tw*SW] or 0
    past the kernel, TH = ceil(KH/SH), TW = ceil(KW/SW) (sub-pixel kernel, Triton backward). Equivalent::

        w = weight.detach().reshape(G, Cin // G, Cout // G, KH, KW)
        taps = w.permute(0, 3, 4, 1, 2).contiguous()
    """
    cin, cout_g, kh, kw = weight.shape
    w = weight.detach().reshape(groups, cin // groups, cout_g, kh, kw)
    if order == "taps":
        return w.permute(0, 3, 4, 1, 2).contiguous()
    (sh, sw), (th, tw) = stride, (cdiv(kh, stride[0]), cdiv(kw, stride[1]))
    if (th * sh, tw * sw) != (kh, kw):
        w = torch.nn.functional.pad(w, (0, tw * sw - kw, 0, th * sh - kh))  # zero taps past the kernel
    w = w.reshape(groups, cin // groups, cout_g, th, sh, tw, sw)           # kh = t*SH + r
    dims = (0, 3, 5, 1, 4, 6, 2) if order == "subpixel_co" else (0, 3, 5, 1, 4, 2, 6)
    return w.permute(*dims).reshape(groups, th * tw * (cin // groups), sh * sw * cout_g).contiguous()


# ---------------------------------------------------------------- Conv2d (vlfast/ops/conv2d_triton.py)
def conv2d_config(m: int, cout_g: int, cin_g: int, dtype: torch.dtype) -> dict:
    """Tiles of conv2d_igemm_kernel: M = N*OH*OW rows, N = Cout/G columns, K = taps x Cin/G (the phase
    kernel's rule: a GEMM whose columns are output channels)."""
    return phase_config(m, cout_g, cin_g, dtype)


def depthwise_config(m: int, cout: int) -> dict:
    """Tiles of conv2d_depthwise_kernel: [pixels, output channels], no tl.dot (one multiply-add per tap)."""
    if backends.interpret_mode():
        return dict(BLOCK_M=clamp_pow2(m, 16, 64), BLOCK_C=clamp_pow2(cout, 1, 32), num_warps=4)
    block_c = clamp_pow2(cout, 16, 64)
    return dict(BLOCK_M=128 if block_c <= 32 else 64, BLOCK_C=block_c, num_warps=4)


def conv2d_weight(weight: Tensor, groups: int, order: str) -> Tensor:
    """A Conv2d weight (Cout, Cin/G, KH, KW) arranged for a kernel, a new contiguous tensor (made on every
    call, as :func:`arranged_weight`'s). ``order``: "taps" -> (G, KH, KW, Cin/G, Cout/G), one matrix per tap
    (conv2d_igemm_kernel); "depthwise" -> (KH*KW, Cout), every output channel's tap in a row
    (conv2d_depthwise_kernel, Cin/G == 1). Equivalent::

        w = weight.detach().reshape(G, Cout // G, Cin // G, KH, KW)
        taps = w.permute(0, 3, 4, 2, 1).contiguous()
    """
    cout, cin_g, kh, kw = weight.shape
    if order == "depthwise":
        return weight.detach().reshape(cout, kh * kw).t().contiguous()
    return weight.detach().reshape(groups, cout // groups, cin_g, kh, kw).permute(0, 3, 4, 2, 1).contiguous()


def split_k(reduction: int, tiles: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, length of each) of a weight gradient's reduction (output pixels or cells) over enough
    programs to fill the GPU: about two per SM with ``tiles`` output tiles, each split a whole number of
    ``block_k`` chunks and at least four of them; each split writes a float32 partial, summed in a fixed
    order (deterministic: no atomics)."""
    split = max(1, min(cdiv(2 * num_sms(device), tiles), cdiv(reduction, 4 * block_k)))
    per_split = cdiv(cdiv(max(reduction, 1), split), block_k) * block_k
    return cdiv(max(reduction, 1), per_split), per_split
