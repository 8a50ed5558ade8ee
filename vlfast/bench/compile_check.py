"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU, and read what the GPU would run.

The interpreter proves a kernel's arithmetic, not its compilation: layouts, register pressure and
vector widths only show when Triton lowers it for a real target. Triton's ahead-of-time path
(``triton.compile`` with a ``GPUTarget``) runs its whole pipeline, ``ptxas`` included, with no GPU, so
this module compiles the kernels at the configurations their launchers pick for the benchmark shapes
and reports, per kernel: registers, stack and local memory (spills), the widths of the global loads
and stores in the PTX, and whether the tensor-core path is ``wgmma``. ``tests/test_compile_check.py``
turns the facts the kernels rely on into assertions. Run it by hand::

    python -m vlfast.bench.compile_check          # one line per case
"""

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from unittest import mock

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: an H100


@dataclass
class Compiled:
    registers: int
    stack: int      # bytes of stack frame a thread: spills or local arrays
    local: int
    loads: Counter  # PTX global load instructions by width, e.g. "ld.global.v4.b32"
    stores: Counter
    wgmma: bool

    def vector_stores(self) -> bool:
        return any(".v4." in k or ".v2." in k for k in self.stores)

    def vector_loads(self) -> bool:
        return any(".v4." in k or ".v2." in k for k in self.loads)


def compile_sm90(fn, types: dict, ints: dict, consts: dict, num_warps: int, num_stages: int = 3,
                 unspecialized: frozenset = frozenset()) -> Compiled:
    """Compile ``fn`` for sm_90 as Triton's launcher would specialise a call with these arguments.

    types: pointer argument -> element type ("bf16", "fp32", ...); ints: integer argument -> a value
    (1 becomes a constant, multiples of 16 get the divisibility hint, as at run time, except for
    ``unspecialized`` names); consts: constexpr argument -> value; float arguments are "fp32".
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, hints = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name], constants[name] = "constexpr", consts[name]
        elif name in types:
            signature[name] = "*" + types[name]
            hints[(i,)] = [["tt.divisibility", 16]]
        elif name in ints:
            value = ints[name]
            if value == 1 and name not in unspecialized:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if value % 16 == 0 and name not in unspecialized:
                    hints[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    kernel = triton.compile(ASTSource(fn, signature, constants, hints), target=GPUTarget(*TARGET),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    registers, stack, local = _resources(kernel.asm["cubin"])
    return Compiled(registers, stack, local, Counter(re.findall(r"ld\.global[\w.]*", ptx)),
                    Counter(re.findall(r"st\.global[\w.]*", ptx)), "wgmma" in ptx)


def _resources(cubin: bytes) -> tuple[int, int, int]:
    import triton.backends.nvidia as nvidia
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", text, re.S)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[:300]}")
    return tuple(int(v) for v in found.groups())


def _pow2(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


# ---------------------------------------------------------------- the kernels at their benchmark shapes
def conv_transpose_case(n, cin, cout, h, k, s, p, x_nchw: bool, out_nchw: bool, dtype: str = "bf16") -> Compiled:
    """conv_transpose2d_subpixel_kernel as the launcher configures it for this geometry (square, groups 1)."""
    from vlfast import backends
    from vlfast.kernels.conv_transpose import conv_transpose2d_subpixel_kernel as kernel
    from vlfast.ops.conv_transpose_triton import _cells, subpixel_config
    import torch

    oh = (h - 1) * s - 2 * p + k
    taps, c0, cells = _cells(h, oh, k, s, p)
    if taps > 1 and x_nchw and cin >= 16:  # the launcher makes such inputs channels_last first
        x_nchw = False
    crop = bool(p % s or (c0 + cells) * s - p > oh)
    w_rows = out_nchw and (s & (s - 1)) == 0
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    with mock.patch.object(backends, "interpret_mode", return_value=False):
        cfg = subpixel_config(n * cells * cells, s * s * cout, taps * taps * cin, cin, torch_dtype,
                              wide=taps == 1 and not crop and (w_rows or not out_nchw))
    w_rows = w_rows and cfg["BLOCK_N"] % s == 0
    w_tile = min(_pow2(cells), cfg["BLOCK_M"]) if (w_rows or x_nchw) else 0
    xs = (cin * h * h, h * h, h, 1) if x_nchw else (cin * h * h, 1, h * cin, cin)
    ys = (cout * oh * oh, oh * oh, oh, 1) if out_nchw else (cout * oh * oh, 1, oh * cout, cout)
    ints = dict(N=n, H=h, W=h, OH=oh, OW=oh, CH0=c0, CW0=c0, CH=cells, CW=cells, OH0=c0 * s - p, OW0=c0 * s - p,
                CIN_G=cin, COUT_G=cout, SH=s, stride_xn=xs[0], stride_xc=xs[1], stride_xh=xs[2], stride_xw=xs[3],
                stride_on=ys[0], stride_oc=ys[1], stride_oh=ys[2], stride_ow=ys[3])
    consts = dict(HAS_BIAS=True, ACT=2, PRECISION="tf32", TH=taps, TW=taps, SW=s, RW_INNER=out_nchw, W_TILE=w_tile,
                  W_ROWS_STORE=w_rows, CROP=crop, **{k: v for k, v in cfg.items() if k.isupper()})
    types = {name: dtype for name in ("x_ptr", "wsp_ptr", "bias_ptr", "out_ptr")}
    return compile_sm90(kernel, types, ints, consts, cfg["num_warps"], cfg["num_stages"],
                        frozenset({"N", "H", "W", "SH"}))


def conv_transpose_backward_cases(n, cin, cout, h, k, s, p, dtype: str = "bf16") -> tuple[Compiled, Compiled]:
    """The dgrad and wgrad kernels of a channels_last transposed convolution, as their launcher configures them."""
    import torch
    from vlfast import backends
    from vlfast.kernels import conv_transpose as kernels
    from vlfast.ops.conv_transpose_triton import _cells, backward_config

    oh = (h - 1) * s - 2 * p + k
    taps, c0, cells = _cells(h, oh, k, s, p)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    xs, ys = (cin * h * h, 1, h * cin, cin), (cout * oh * oh, 1, oh * cout, cout)
    unspecialized = frozenset({"N", "H", "W", "OH", "OW", "CH", "CW", "SH", "cells_per_split"})
    with mock.patch.object(backends, "interpret_mode", return_value=False):
        dcfg = backward_config(n * h * h, cin, s * cout, torch_dtype)
        wcfg = backward_config(taps * taps * cin, s * s * cout, n * cells * cells, torch_dtype)
    wcfg["BLOCK_M"] = min(wcfg["BLOCK_M"], _pow2(taps * taps * cin))
    common = dict(PRECISION="tf32", TH=taps, TW=taps, SW=s)
    ints = dict(N=n, H=h, W=h, OH=oh, OW=oh, CIN_G=cin, COUT_G=cout, SH=s, PH=p, PW=p, CH0=c0, CW0=c0, CH=cells,
                CW=cells, cells_per_split=4096, stride_dn=ys[0], stride_dc=ys[1], stride_dh=ys[2], stride_dw=ys[3],
                stride_xn=xs[0], stride_xc=xs[1], stride_xh=xs[2], stride_xw=xs[3])
    dgrad = compile_sm90(kernels.conv_transpose2d_dgrad_kernel, {"dy_ptr": dtype, "wsp_ptr": dtype, "dx_ptr": dtype},
                         ints, dict(common, GROUP_M=8, **{k: v for k, v in dcfg.items() if k.isupper()}),
                         dcfg["num_warps"], dcfg["num_stages"], unspecialized)
    wgrad = compile_sm90(kernels.conv_transpose2d_wgrad_kernel, {"x_ptr": dtype, "dy_ptr": dtype, "part_ptr": "fp32"},
                         ints, dict(common, **{k: v for k, v in wcfg.items() if k.isupper()}),
                         wcfg["num_warps"], wcfg["num_stages"], unspecialized)
    return dgrad, wgrad


def group_norm_case(n, c, g, hw, channels_last: bool, dtype: str = "bf16") -> Compiled:
    """The single-pass GroupNorm forward the launcher picks (ddpm pattern: add, weight, bias, SiLU)."""
    import torch
    from vlfast.kernels import group_norm as kernels
    from vlfast.ops.group_norm_triton import _warps, default_groups_per_program

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cpg = c // g
    stride_c, stride_s = (1, c) if channels_last else (hw, 1)
    gpp = default_groups_per_program(n, c, g, hw, torch_dtype, stride_c, torch.device("cpu"))  # an H100: 132 SMs
    block_c, block_s = _pow2(cpg), _pow2(hw)
    ints = dict(S=hw, G=g, CPG=cpg, stride_n=c * hw, stride_c=stride_c, stride_s=stride_s, stride_an=c,
                stride_scn=c, stride_shn=c)
    consts = dict(HAS_W=True, HAS_B=True, HAS_ADD=True, HAS_SCALE=False, HAS_SHIFT=False, ACT=1,
                  BLOCK_C=block_c, BLOCK_S=block_s)
    types = {name: dtype for name in ("x_ptr", "out_ptr", "add_ptr")}
    types.update({name: "fp32" for name in ("mean_ptr", "rstd_ptr", "w_ptr", "b_ptr", "scale_ptr", "shift_ptr")})
    if gpp == 0:
        return compile_sm90(kernels.group_norm_fwd_fused_kernel, types, ints, consts, _warps(block_c * block_s))
    consts.update(CPG=cpg, GPP=gpp)
    return compile_sm90(kernels.group_norm_fwd_fused_groups_kernel, types, ints, consts,
                        _warps(gpp * block_c * block_s))


def group_norm_bwd_case(n, c, g, hw, dtype: str = "bf16") -> Compiled:
    """The single-pass GroupNorm backward of the ddpm pattern, NCHW, every gradient needed."""
    from vlfast.kernels import group_norm as kernels
    from vlfast.ops.group_norm_triton import _warps

    cpg = c // g
    block_c, block_s = _pow2(cpg), _pow2(hw)
    ints = dict(C=c, S=hw, G=g, CPG=cpg, stride_n=c * hw, stride_c=hw, stride_s=1, stride_an=c, stride_scn=c,
                stride_shn=c)
    consts = dict(HAS_W=True, HAS_B=True, HAS_ADD=True, HAS_SCALE=False, HAS_SHIFT=False, ACT=1, NEED_DX=True,
                  NEED_DADD=True, NEED_DSCALE=False, NEED_DSHIFT=False, NEED_WB=True, BLOCK_C=block_c, BLOCK_S=block_s)
    types = {name: dtype for name in ("x_ptr", "dy_ptr", "dx_ptr", "add_ptr", "dadd_ptr")}
    types.update({name: "fp32" for name in ("mean_ptr", "rstd_ptr", "w_ptr", "b_ptr", "scale_ptr", "shift_ptr",
                                            "dscale_ptr", "dshift_ptr", "pdb_ptr", "pdw_ptr")})
    return compile_sm90(kernels.group_norm_bwd_fused_kernel, types, ints, consts, _warps(2 * block_c * block_s))


CASES = {
    "conv N8 1024-512 32 k2s2 bf16 NHWC": lambda: conv_transpose_case(8, 1024, 512, 32, 2, 2, 0, False, False),
    "conv N8 1024-512 32 k2s2 bf16 NCHW": lambda: conv_transpose_case(8, 1024, 512, 32, 2, 2, 0, True, True),
    "conv N8 256-128 64 k4s2p1 bf16 NHWC": lambda: conv_transpose_case(8, 256, 128, 64, 4, 2, 1, False, False),
    "conv N8 21-21 16 k64s32p16 bf16 NCHW": lambda: conv_transpose_case(8, 21, 21, 16, 64, 32, 16, True, True),
    "conv N8 64-3 128 k4s2p1 bf16 NHWC": lambda: conv_transpose_case(8, 64, 3, 128, 4, 2, 1, False, False),
    "conv dgrad N8 1024-512 32 k2s2 bf16 NHWC": lambda: conv_transpose_backward_cases(8, 1024, 512, 32, 2, 2, 0)[0],
    "conv wgrad N8 1024-512 32 k2s2 bf16 NHWC": lambda: conv_transpose_backward_cases(8, 1024, 512, 32, 2, 2, 0)[1],
    "gn 16x256x64x64 bf16 NCHW": lambda: group_norm_case(16, 256, 32, 64 * 64, False),
    "gn 16x256x64x64 bf16 NHWC": lambda: group_norm_case(16, 256, 32, 64 * 64, True),
    "gn 64x128x32x32 bf16 NHWC": lambda: group_norm_case(64, 128, 32, 32 * 32, True),
    "gn backward 64x128x32x32 bf16 NCHW": lambda: group_norm_bwd_case(64, 128, 32, 32 * 32),
}


def main():
    import argparse
    import json
    import triton

    ap = argparse.ArgumentParser(description="Compile vlfast's Triton kernels for sm_90 without a GPU.")
    ap.add_argument("--json", action="store_true", help="one JSON object (case -> facts) instead of the table")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset: under the interpreter the kernels are not compiled")
    results = {name: make() for name, make in CASES.items()}
    if args.json:
        print(json.dumps({name: dict(vars(r), loads=dict(r.loads), stores=dict(r.stores))
                          for name, r in results.items()}))
        return
    print(f"Triton {triton.__version__}, target sm_{TARGET[1]}")
    for name, r in results.items():
        print(f"{name:40s} regs {r.registers:3d} stack {r.stack:4d} local {r.local:3d} "
              f"{'wgmma' if r.wgmma else '     '} loads {dict(r.loads)} stores {dict(r.stores)}")


if __name__ == "__main__":
    main()
