"""Build vlfast and its C++/CUDA extension vlfast._C.

    pip install --no-build-isolation -e .    # torch must be installed first

The extension always has the CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp); where
torch is a CUDA build and nvcc is found (CUDA_HOME), it also has the CUDA
kernels (csrc/cuda/*.cu, csrc/cuda/*.cpp). Environment:

    VLFAST_NO_EXTENSION=1   skip the extension: a pure-Python install
    TORCH_CUDA_ARCH_LIST    CUDA archs to build for (default "8.0;9.0")
    MAX_JOBS                parallel compile jobs (read by torch's BuildExtension)
    VLFAST_SKIP_CUDA        comma-separated ops whose CUDA kernels to leave out, e.g. "group_norm"
                            (the op then runs on its other backends)
"""

import glob
import os
import sys

from setuptools import find_namespace_packages, setup


def get_extensions():
    """(ext_modules, cmdclass) for setup(); both empty with VLFAST_NO_EXTENSION=1."""
    if os.environ.get("VLFAST_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno lets GCC vectorise sqrt in the CPU kernels; -g0 overrides the -g of Python's own
    # build flags (no debug info: a third less compile time).
    cxx = ["-O3", "-fno-math-errno", "-g0"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform == "linux":
        # at::parallel_for is inline: without -fopenmp it runs on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # A plain (per-Python-version) build, as torch's own extensions are: the stable-ABI build
    # crashed on raising a TORCH_CHECK error under torch 2.11 (seen 2026-11-26 on the GPU image).
    common = {"extra_link_args": link}
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is not None and has_nvcc:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        skip = [name for name in os.environ.get("VLFAST_SKIP_CUDA", "").split(",") if name]
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        sources += [f for f in cuda_sources if not any(os.path.basename(f).startswith(name) for name in skip)]
        flags = {"cxx": cxx + ["-DVLFAST_WITH_CUDA"], "nvcc": ["-O3", "-DVLFAST_WITH_CUDA"]}
        ext = CUDAExtension("vlfast._C", sources, extra_compile_args=flags, **common)
    else:
        ext = CppExtension("vlfast._C", sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": _shared_libstdcxx(BuildExtension)}


def _shared_libstdcxx(build_ext):
    """``build_ext`` that links libstdc++ dynamically whatever the environment's flags say.

    Why: on one GPU image (torch 2.11, GCC 13, 2026-11-26) the extension came out with libstdc++
    linked in statically (no libstdc++ in its dynamic dependencies, std::ostream code inside it); its
    first std::ostream use, formatting a failing TORCH_CHECK's message, then crashed the process.
    A torch extension must share the process's libstdc++ with torch.
    """
    static = {"-static-libstdc++", "-static-libgcc", "-static"}

    class Build(build_ext):
        def build_extensions(self):
            for attr in ("linker_so", "linker_so_cxx", "linker_exe", "compiler_so", "compiler_so_cxx"):
                cmd = getattr(self.compiler, attr, None)
                if isinstance(cmd, list):
                    setattr(self.compiler, attr, [a for a in cmd if a not in static])
            for ext in self.extensions:
                ext.extra_link_args = [a for a in ext.extra_link_args if a not in static]
            super().build_extensions()
    return Build


def get_packages():
    """vlfast and its subpackages, plus the top-level kernels/ installed as vlfast.kernels."""
    exclude = ["*.__pycache__", "*.__pycache__.*"]
    vlfast = find_namespace_packages(include=["vlfast", "vlfast.*"], exclude=exclude)
    kernels = ["vlfast.kernels." + p for p in find_namespace_packages("kernels", exclude=exclude)]
    return vlfast + ["vlfast.kernels"] + kernels


ext_modules, cmdclass = get_extensions()
setup(
    name="vlfast",
    version="0.1.0",
    description="Fused GPU kernels for the layers of segmentation U-Nets, VAEs and DDPM diffusion models",
    packages=get_packages(),
    package_dir={"vlfast.kernels": "kernels"},
    package_data={"vlfast.tuning": ["*.json"]},  # the per-card tables of measured backend orders
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    # bench: `python -m vlfast bench`'s progress bar and the GPU clocks, power limit and driver it reports;
    # `python -m vlfast sample`'s image grid; the figures of `bench --plot` and `profile --plot`.
    # test: expecttest is what PyTorch's own module samples (torch.testing._internal) import.
    extras_require={"triton": ["triton>=3.6"], "bench": ["tqdm", "nvidia-ml-py", "pillow", "matplotlib"],
                    "test": ["pytest", "diffusers", "expecttest"]},
)
