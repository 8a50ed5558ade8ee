"""Test setup: Triton runs CPU tensors under its interpreter, so every backend is testable without a GPU."""

import os
import threading

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports vlfast.kernels

import pytest  # noqa: E402
import torch  # noqa: E402

from vlfast import backends  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # dtype -> test id
# GroupNorm: the gradients in the backward's order, and the fused patterns (which of add / scale / shift
# are given, and the activation) the kernel tests share.
GN_GRADS = ("dx", "dweight", "dbias", "dadd", "dscale", "dshift")
GN_PATTERNS = {
    "plain": ((), None),
    "ddpm": (("add",), "silu"),
    "adm": (("scale", "shift"), "silu"),
    "all-relu": (("add", "scale", "shift"), "relu"),
    "scale-gelu": (("scale",), "gelu"),
    "shift": (("shift",), None),
}
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def runnable(device: str, op: str | None = None) -> list[str]:
    """Backends that can run ``op`` on this device here; Triton on CPU only when interpreting."""
    dev = torch.device(device)
    return [name for name in backends.BACKENDS if not backends.not_supported_reasons(name, op, device=dev)]


def backend_params(op: str | None = None):
    """pytest params (device, backend) with readable ids, e.g. ``cpu-triton``."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in runnable(d, op)]


@pytest.fixture
def poison_empty():
    """Fresh outputs (torch.empty*, at::empty*) come filled with NaN, so an unwritten element fails."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)


gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def pytorch_module_db() -> dict:
    """{name: ModuleInfo} of PyTorch's own module samples (torch.testing._internal.common_modules), imported
    so that the rest of the session may still set torch.backends flags: importing PyTorch's test utilities
    freezes them (torch.backends.disable_global_flags), which would break every later test that sets one."""
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    # Undo torch.backends.disable_global_flags(). torch.backends is a module wrapper: the flag lives in the
    # globals of its functions (torch 2.13, 2026-11-30).
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return {m.name: m for m in common_modules.module_db}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where none is present)")


def run_in_threads(work, count: int) -> list:
    """Run work(k) for k < count in as many threads at once; the exceptions they raised."""
    errors = []

    def guarded(k):
        try:
            work(k)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
