"""The Triton kernels compiled for an H100 (sm_90) here, without a GPU: they must lower, must not spill,
and must keep the vector loads and stores their designs rely on (tools/compile_check.py, run by path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compile_check.py"


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter does not compile
    run = subprocess.run([sys.executable, str(TOOL), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def is_vector(widths: dict) -> bool:
    return any(".v4." in k or ".v2." in k for k in widths)


def test_no_kernel_spills(compiled):
    spills = {name: (r["stack"], r["local"]) for name, r in compiled.items() if r["stack"] or r["local"]}
    assert not spills, f"stack/local bytes per thread: {spills}"


@pytest.mark.parametrize("case", ["conv N8 1024-512 32 k2s2 bf16 NHWC", "conv N8 1024-512 32 k2s2 bf16 NCHW",
                                  "conv N8 256-128 64 k4s2p1 bf16 NHWC", "conv N8 21-21 16 k64s32p16 bf16 NCHW"])
def test_conv_transpose_stores_vectors_on_tensor_cores(compiled, case):
    """Channel-contiguous scatter and NCHW row segments both store 16-byte vectors; the GEMM runs on wgmma."""
    r = compiled[case]
    assert r["wgmma"], case
    assert "st.global.v4.b32" in r["stores"], r["stores"]


@pytest.mark.parametrize("case", ["gn 16x256x64x64 bf16 NHWC", "gn 64x128x32x32 bf16 NHWC"])
def test_group_norm_channels_last_loads_vectors(compiled, case):
    """Channels_last GroupNorm reads each position's run of channels as vectors, not element by element."""
    r = compiled[case]
    assert is_vector(r["loads"]) and "ld.global.b16" not in r["loads"], r["loads"]


@pytest.mark.parametrize("case", ["gn 16x256x64x64 bf16 NCHW", "gn backward 64x128x32x32 bf16 NCHW"])
def test_group_norm_loads_channel_parameters_once_per_channel(compiled, case):
    """Weight, bias and the time embedding are loaded per channel a thread covers, not per element
    (loaded in the tile's 2-D shape, Triton 3.6 issued 192 scalar loads a thread at 16x256x64x64)."""
    r = compiled[case]
    scalar = sum(v for k, v in r["loads"].items() if ".v" not in k)
    assert scalar <= 32, r["loads"]


@pytest.mark.parametrize("case", ["conv2d N8 256-256 64 k3d2 bf16 NHWC", "conv2d N8 256-256 64 k3d2 bf16 NCHW",
                                  "conv2d N8 64-64 128 k3d8 bf16 NHWC"])
def test_conv2d_stores_vectors_on_tensor_cores(compiled, case):
    """The dilated conv's implicit GEMM runs on wgmma and stores 16-byte vectors: channel runs for a
    channels_last output, runs along W of its 2-D row tiles for an NCHW one (1-D tiles scattered single
    elements there and spilled)."""
    r = compiled[case]
    assert r["wgmma"], case
    assert "st.global.v4.b32" in r["stores"], r["stores"]


@pytest.mark.parametrize("case", ["conv2d depthwise N8 256 64 k3d2 bf16 NHWC",
                                  "conv2d depthwise N8 256 64 k3d2 bf16 NCHW"])
def test_conv2d_depthwise_stores_vectors(compiled, case):
    """The direct depthwise kernel stores 16-byte vectors in both layouts; channels_last reads vectors too."""
    r = compiled[case]
    assert "st.global.v4.b32" in r["stores"], r["stores"]
    if case.endswith("NHWC"):
        assert is_vector(r["loads"]) and "ld.global.b16" not in r["loads"], r["loads"]


@pytest.mark.parametrize("case", ["conv2d dgrad N8 256-256 64 k3d2 bf16 NHWC",
                                  "conv2d wgrad N8 256-256 64 k3d2 bf16 NHWC"])
def test_conv2d_backward_on_tensor_cores(compiled, case):
    """dx (the transposed convolution's phase kernel at dilation 2) and dweight both run on wgmma."""
    assert compiled[case]["wgmma"], case
