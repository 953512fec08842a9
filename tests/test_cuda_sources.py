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
@pytest.mark.timeout(900)  # lstm_persistent.cu's eight variants take minutes of one core
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


# Host sources of fptt_fast._C (bindings, CPU kernels, CUDA glue, their headers)
HOST_SOURCES = sorted(
    glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "*", "*.h"))
    + glob.glob(os.path.join(ROOT, "csrc", "include", "fptt_fast", "*.h")))
_STREAM_USE = re.compile(r"\bTORCH_CHECK\s*\(|\bTORCH_WARN|\bAT_ERROR\b|std::(o|i)?stringstream|std::ostream"
                         r"|\boperator\s*<<|std::cout|std::cerr")


def _code_only(text):
    """The text without // and /* */ comments and string literals (a check's message may
    mention TORCH_CHECK)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def test_there_are_host_sources():
    names = {os.path.basename(p) for p in HOST_SOURCES}
    assert {"bindings.cpp", "update_checks.h", "lstm_checks.h", "error_message.h", "glue_common.h"} <= names


@pytest.mark.parametrize("path", HOST_SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_no_iostream_formatting_in_host_code(path):
    """Error messages go through FPTT_CHECK (csrc/include/fptt_fast/error_message.h), never
    through TORCH_CHECK's c10::str or any stream: on the GPU image, formatting a number
    through an ostream instantiated in fptt_fast._C crashed the process."""
    if os.path.basename(path) == "error_message.h":
        return  # the one place that wraps TORCH_CHECK
    with open(path) as f:
        code = _code_only(f.read())
    bad = [m.group(0) for m in _STREAM_USE.finditer(code)]
    assert not bad, f"{os.path.relpath(path, ROOT)} uses {sorted(set(bad))}: use FPTT_CHECK"


def test_stream_lint_catches_a_planted_use():
    """The lint above can fail: a planted TORCH_CHECK with a message and a stream are found,
    a comment or string mentioning them is not."""
    code = _code_only('// TORCH_CHECK(x, "n=", n)\nauto s = "TORCH_CHECK(";\nTORCH_CHECK (ok, "n=", n);\n'
                      'std::ostringstream os; os << n;\n')
    assert sorted({m.group(0).replace(" ", "") for m in _STREAM_USE.finditer(code)}) == [
        "TORCH_CHECK(", "std::ostringstream"]
