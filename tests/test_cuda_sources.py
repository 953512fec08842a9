"""The CUDA sources build on every machine with nvcc, GPU or not.

csrc/cuda/*.cu must compile with plain `nvcc -c -arch=sm_90 -I csrc/include` (no torch
headers, no -rdc), and csrc/include/fptt_fast/cuda_kernels.h must be plain C++.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
INCLUDE = os.path.join(ROOT, "csrc", "include")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
_TORCH_HEADER = re.compile(r"^(torch|ATen|c10|pybind11|caffe2)/|^Python\.h$")


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_no_torch_headers_in_cu(path):
    with open(path) as f:
        includes = _INCLUDE_RE.findall(f.read())
    bad = [h for h in includes if _TORCH_HEADER.search(h)]
    assert not bad, f"{os.path.relpath(path, ROOT)} includes torch headers: {bad}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_compiles_with_plain_nvcc(path, tmp_path):
    cmd = [NVCC, "-c", "-arch=sm_90", "-I", INCLUDE, path, "-o", str(tmp_path / "out.o")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(" ".join(cmd))
    print(r.stdout)
    print(r.stderr)
    assert r.returncode == 0, (f"nvcc failed ({r.returncode}) on {os.path.relpath(path, ROOT)}:\n"
                               f"{r.stdout}\n{r.stderr}")
    assert (tmp_path / "out.o").stat().st_size > 0


def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler found")
def test_cuda_kernels_header_is_plain_cpp(tmp_path):
    """cuda_kernels.h compiles with a plain C++ compiler and no CUDA or torch include path."""
    src = tmp_path / "t.cpp"
    src.write_text('#include "fptt_fast/cuda_kernels.h"\n'
                   "static_assert(fptt::cuda::kChunk % 4 == 0, \"\");\n"
                   "int main() { return int(fptt::cuda::chunks_of(0) != 1); }\n")
    cmd = [_cxx(), "-std=c++17", "-fsyntax-only", "-I", INCLUDE, str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
