"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU, and read what the GPU would run.

The interpreter proves a kernel's arithmetic, not its compilation: layouts, register pressure and
vector widths only show when Triton lowers it for a real target. Triton's ahead-of-time path
(``triton.compile`` with a ``GPUTarget``) runs its whole pipeline, ``ptxas`` included, with no GPU, so
this script runs the launchers of the installed vlfast on meta tensors at the benchmark shapes,
records the launches they make (kernel, arguments, tiles) and compiles exactly those, reporting per
kernel: registers, stack and local memory (spills), the widths of the global loads and stores in the
PTX, and whether the tensor-core path is ``wgmma``. ``tests/test_compile_check.py`` turns the facts
the kernels rely on into assertions. Run it from the repository root, without TRITON_INTERPRET::

    python tools/compile_check.py           # one line per case
    python tools/compile_check.py --json    # one JSON object: case -> facts
    python tools/compile_check.py --tiles   # the convolution cases under each tile probe (tools/probes.py)
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


# ---------------------------------------------------------------- the launchers' own launches
_PTR = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def launches(module, run) -> list:
    """Run ``run()`` (a launcher call on meta tensors: nothing is allocated or computed) with every
    ``*_kernel`` of ``module`` replaced by a recorder, as on a GPU (not the interpreter's tiles), and
    return what the launchers launched: (kernel, positional args, keyword args) per launch."""
    import contextlib

    from vlfast import backends
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    with contextlib.ExitStack() as stack:
        for name in dir(module):
            if name.endswith("_kernel"):
                stack.enter_context(mock.patch.object(module, name, Recorder(getattr(module, name))))
        stack.enter_context(mock.patch.object(backends, "interpret_mode", return_value=False))
        run()
    return calls


def compile_launch(fn, args, kwargs) -> Compiled:
    """One recorded launch compiled for sm_90 with the launch's own arguments and specialisation."""
    import torch
    types, ints = {}, {}
    for name, value in zip(fn.arg_names, args):
        if isinstance(value, torch.Tensor):
            types[name] = _PTR[str(value.dtype)]
        elif isinstance(value, int):
            ints[name] = value
    consts = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    unspecialized = frozenset(fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize)
    return compile_sm90(fn, types, ints, consts, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3),
                        unspecialized)


def _meta(shape, dtype, channels_last=False):
    import torch
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.to(memory_format=torch.channels_last) if channels_last else t


def conv_transpose_case(n, cin, cout, h, k, s, p, x_nchw: bool, out_nchw: bool, dtype=None) -> Compiled:
    """The forward launch of ``conv_transpose2d_into`` at this geometry (square, groups 1, bias, ReLU)."""
    import torch
    from vlfast.kernels import conv_transpose as kernels
    from vlfast.ops.conv_transpose_triton import conv_transpose2d_into
    dtype = dtype or torch.bfloat16
    oh = (h - 1) * s - 2 * p + k
    x = _meta((n, cin, h, h), dtype, not x_nchw)
    out = _meta((n, cout, oh, oh), dtype, not out_nchw)
    w, b = _meta((cin, cout, k, k), dtype), _meta((cout,), dtype)
    (call,) = [c for c in launches(kernels, lambda: conv_transpose2d_into(
        out, x, w, b, (s, s), (p, p), (0, 0), 1, (1, 1), 2)) if c[0].__name__.endswith("subpixel_kernel")]
    return compile_launch(*call)


def conv_transpose_backward_case(n, cin, cout, h, k, s, p, which: str, dtype=None) -> Compiled:
    """The dgrad or wgrad launch of ``conv_transpose2d_backward`` (channels_last)."""
    import torch
    from vlfast.kernels import conv_transpose as kernels
    from vlfast.ops.conv_transpose_triton import conv_transpose2d_backward
    dtype = dtype or torch.bfloat16
    oh = (h - 1) * s - 2 * p + k
    x, dy = _meta((n, cin, h, h), dtype, True), _meta((n, cout, oh, oh), dtype, True)
    calls = launches(kernels, lambda: conv_transpose2d_backward(dy, x, _meta((cin, cout, k, k), dtype), (s, s),
                                                                (p, p), 1, (True, True)))
    (call,) = [c for c in calls if c[0].__name__.endswith(f"{which}_kernel")]
    return compile_launch(*call)


def conv2d_case(n, cin, cout, h, k, d, x_nhwc: bool, out_nhwc: bool, groups=1, dtype=None) -> Compiled:
    """The forward launch of conv2d_triton's plan at this geometry ("same" padding d*(k-1)/2, stride 1, bias,
    ReLU): the implicit-GEMM kernel, or the depthwise one where groups == cin."""
    import torch
    from vlfast.kernels import conv2d as kernels
    from vlfast.ops.conv2d_triton import plan_into
    dtype = dtype or torch.bfloat16
    p = d * (k - 1) // 2
    x, out = _meta((n, cin, h, h), dtype, x_nhwc), _meta((n, cout, h, h), dtype, out_nhwc)
    w, b = _meta((cout, cin // groups, k, k), dtype), _meta((cout,), dtype)

    def run():
        plan = plan_into(out, x, w, b, None, [1, 1], [p, p], [d, d], groups, 2)
        plan(out, x, w, b, None)
    (call,) = launches(kernels, run)
    return compile_launch(*call)


def conv2d_backward_case(n, cin, cout, h, k, d, which: str, dtype=None) -> Compiled:
    """The dgrad (the transposed convolution's phase kernel) or wgrad launch of ``conv2d_backward``
    (channels_last, "same" padding, stride 1)."""
    import torch
    from vlfast.kernels import conv2d, conv_transpose
    from vlfast.ops.conv2d_triton import conv2d_backward
    dtype = dtype or torch.bfloat16
    p = d * (k - 1) // 2
    x, dy = _meta((n, cin, h, h), dtype, True), _meta((n, cout, h, h), dtype, True)
    needs = (which == "dgrad", which == "wgrad")
    calls = launches(conv_transpose if which == "dgrad" else conv2d, lambda: conv2d_backward(
        dy, x, _meta((cout, cin, k, k), dtype), [1, 1], [p, p], [d, d], 1, needs))
    (call,) = calls
    return compile_launch(*call)


def group_norm_case(n, c, g, hw, channels_last: bool, backward=False, dtype=None) -> Compiled:
    """The GroupNorm launch of the ddpm pattern (add, fp32 weight and bias, SiLU) at this shape: the
    forward's first kernel, or the backward's first (every gradient needed)."""
    import torch
    from vlfast.kernels import group_norm as kernels
    from vlfast.ops.group_norm_triton import group_norm_bwd, group_norm_fwd
    dtype = dtype or torch.bfloat16
    x = _meta((n, c, hw, 1), dtype, channels_last)
    w, b, add = _meta((c,), torch.float32), _meta((c,), torch.float32), _meta((n, c), dtype)
    if backward:
        stats = _meta((n, g), torch.float32)
        calls = launches(kernels, lambda: group_norm_bwd(x, x, g, w, b, add, None, None, "silu", stats, stats,
                                                         (True,) * 6))
    else:
        calls = launches(kernels, lambda: group_norm_fwd(x, g, w, b, 1e-5, add, None, None, "silu"))
    return compile_launch(*calls[0])


CASES = {
    "conv N8 1024-512 32 k2s2 bf16 NHWC": lambda: conv_transpose_case(8, 1024, 512, 32, 2, 2, 0, False, False),
    "conv N8 1024-512 32 k2s2 bf16 NCHW": lambda: conv_transpose_case(8, 1024, 512, 32, 2, 2, 0, True, True),
    "conv N8 256-128 64 k4s2p1 bf16 NHWC": lambda: conv_transpose_case(8, 256, 128, 64, 4, 2, 1, False, False),
    "conv N8 21-21 16 k64s32p16 bf16 NCHW": lambda: conv_transpose_case(8, 21, 21, 16, 64, 32, 16, True, True),
    "conv N8 64-3 128 k4s2p1 bf16 NHWC": lambda: conv_transpose_case(8, 64, 3, 128, 4, 2, 1, False, False),
    "conv dgrad N8 1024-512 32 k2s2 bf16 NHWC": lambda: conv_transpose_backward_case(8, 1024, 512, 32, 2, 2, 0, "dgrad"),
    "conv wgrad N8 1024-512 32 k2s2 bf16 NHWC": lambda: conv_transpose_backward_case(8, 1024, 512, 32, 2, 2, 0, "wgrad"),
    "gn 16x256x64x64 bf16 NCHW": lambda: group_norm_case(16, 256, 32, 64 * 64, False),
    "gn 16x256x64x64 bf16 NHWC": lambda: group_norm_case(16, 256, 32, 64 * 64, True),
    "gn 64x128x32x32 bf16 NHWC": lambda: group_norm_case(64, 128, 32, 32 * 32, True),
    "gn backward 64x128x32x32 bf16 NCHW": lambda: group_norm_case(64, 128, 32, 32 * 32, False, backward=True),
    "conv2d N8 256-256 64 k3d2 bf16 NHWC": lambda: conv2d_case(8, 256, 256, 64, 3, 2, True, True),
    "conv2d N8 256-256 64 k3d2 bf16 NCHW": lambda: conv2d_case(8, 256, 256, 64, 3, 2, False, False),
    "conv2d N8 64-64 128 k3d8 bf16 NHWC": lambda: conv2d_case(8, 64, 64, 128, 3, 8, True, True),
    "conv2d depthwise N8 256 64 k3d2 bf16 NHWC": lambda: conv2d_case(8, 256, 256, 64, 3, 2, True, True, groups=256),
    "conv2d depthwise N8 256 64 k3d2 bf16 NCHW": lambda: conv2d_case(8, 256, 256, 64, 3, 2, False, False, groups=256),
    "conv2d dgrad N8 256-256 64 k3d2 bf16 NHWC": lambda: conv2d_backward_case(8, 256, 256, 64, 3, 2, "dgrad"),
    "conv2d wgrad N8 256-256 64 k3d2 bf16 NHWC": lambda: conv2d_backward_case(8, 256, 256, 64, 3, 2, "wgrad"),
}


def tile_cases() -> dict:
    """Each forward implicit-GEMM case of :data:`CASES` compiled under each tile config of tools/probes.py."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.probes import TILES, tile_name
    from vlfast.ops import _overrides
    out = {}
    for name, make in CASES.items():
        if "depthwise" in name or "grad" in name or name.startswith("gn"):
            continue  # not the implicit-GEMM forward
        for t in TILES:
            with _overrides.use(igemm_tiles=t):
                out[f"{name} {tile_name(t).removeprefix('vlfast-triton tiles ')}"] = make()
    return out


def main():
    import argparse
    import json
    import triton

    ap = argparse.ArgumentParser(description="Compile vlfast's Triton kernels for sm_90 without a GPU.")
    ap.add_argument("--json", action="store_true", help="one JSON object (case -> facts) instead of the table")
    ap.add_argument("--tiles", action="store_true",
                    help="the implicit-GEMM forward cases under each tile config of the tuning probes instead")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset: under the interpreter the kernels are not compiled")
    results = tile_cases() if args.tiles else {name: make() for name, make in CASES.items()}
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
