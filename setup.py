"""Build fptt_fast and its extension fptt_fast._C.

The C++ CPU kernels (OpenMP) are always built when torch is importable at build
time (install with --no-build-isolation so the build sees your torch). The CUDA
kernels are added when torch has CUDA and nvcc is found; FPTT_FAST_CUDA=1 forces
them, FPTT_FAST_CUDA=0 leaves them out. FPTT_FAST_NO_EXT=1 skips the extension:
the package then runs on its reference and Triton backends only. FPTT_FAST_TUNING=1
adds the persistent CUDA kernel's tuning entry points (benchmarks/persistent_check.py).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("FPTT_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fptt_fast: torch is not importable at build time; building without fptt_fast._C "
              "(install torch first and use pip's --no-build-isolation)", file=sys.stderr)
        return [], {}
    flag = os.environ.get("FPTT_FAST_CUDA")
    have_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    use_cuda = flag == "1" or (flag != "0" and torch.version.cuda is not None and have_nvcc)
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc/include")]
    # -fno-math-errno lets sqrtf vectorise, -fno-trapping-math the selects of the CPU gate
    # math (floating-point exceptions are masked: nothing traps); no -ffast-math and no FMA
    # contraction: results stay IEEE and the same in every clone (AVX-512, AVX2, baseline)
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", "-std=c++17"]
    kwargs = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if use_cuda:
        # gru_segment.cu is compile-checked (tests/test_cuda_sources.py) but not built in
        # until it is bound and tested on a GPU
        sources += [s for s in rel("csrc/cuda/*.cu") if not s.endswith("gru_segment.cu")]
        sources += rel("csrc/cuda_glue/*.cpp")
        macros = [("FPTT_WITH_CUDA", None)]
        if os.environ.get("FPTT_FAST_TUNING") == "1":
            macros.append(("FPTT_PERSISTENT_TUNING", None))
        ext = cpp_extension.CUDAExtension(
            "fptt_fast._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            **kwargs)
    else:
        ext = cpp_extension.CppExtension("fptt_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fptt_fast",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for FPTT training of recurrent networks",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fptt_fast", "fptt_fast.backends", "fptt_fast.kernels"],
    package_dir={"fptt_fast": "fptt_fast", "fptt_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.1", "triton", "ninja", "pybind11", "tqdm", "matplotlib", "scikit-learn"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fptt-fast=fptt_fast.cli:main"]},
)
