#!/usr/bin/env bash
# Check the CUDA sources without a GPU (CI):
#   1. every csrc/cuda/*.cu compiles with plain `nvcc -c -arch=sm_90 -I csrc/include`
#      (no torch headers allowed in .cu files; checked too);
#   2. every csrc/cuda_glue/*.cpp passes `g++ -fsyntax-only -std=c++17 -DFPTT_WITH_CUDA`
#      against torch's include dirs, Python's and the CUDA include dir.
# Exits non-zero on the first kind of failure found (after checking everything);
# prints what it checked. Skips (exit 0) with a message where nvcc is missing.
#
# Note on the CPU torch wheel (e.g. torch 2.13+cpu): it ships the ATen/cuda and c10/cuda
# headers but not c10/cuda/impl/cuda_cmake_macros.h, which torch generates at build time
# and every c10/cuda header includes. When it is missing, this script supplies the
# one-line stand-in (#define C10_CUDA_BUILD_SHARED_LIBS, what a CUDA wheel's holds) in a
# temporary include dir, and says so. ATen/cuda/CUDAContext.h would also need cuBLAS and
# cuSPARSE headers (cublas_v2.h, cusparse.h), which a bare CUDA toolkit may lack; the glue
# uses c10/cuda headers only, so it does not need them.
#
# Environment: NVCC (compiler path), CXX (default g++), PYTHON (default python3).
set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc)
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_sources: SKIPPED: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)"
  exit 0
fi
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python3}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0

echo "check_cuda_sources: nvcc = $NVCC ($("$NVCC" --version | tail -n 1))"

# ---- 1. .cu files -------------------------------------------------------------------
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "FAIL: no csrc/cuda/*.cu found"
  status=1
fi
for f in "${cu_files[@]}"; do
  if grep -nE '^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/' "$f"; then
    echo "FAIL: $f includes torch headers (the .cu files must build without torch)"
    status=1
  fi
  echo "nvcc -c -arch=sm_90 -I csrc/include $f"
  if ! "$NVCC" -c -arch=sm_90 -I csrc/include "$f" -o "$TMP/$(basename "$f").o"; then
    echo "FAIL: nvcc on $f"
    status=1
  else
    echo "ok:   $f"
  fi
done

# ---- 2. glue .cpp files: syntax only --------------------------------------------------
glue_files=(csrc/cuda_glue/*.cpp)
if [ ${#glue_files[@]} -eq 0 ]; then
  echo "no csrc/cuda_glue/*.cpp to check"
elif ! command -v "$CXX" >/dev/null 2>&1; then
  echo "SKIPPED glue check: no C++ compiler ($CXX)"
elif ! TORCH_INC=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))" 2>"$TMP/torch.err"); then
  echo "SKIPPED glue check: torch is not importable by $PYTHON: $(tail -n 1 "$TMP/torch.err")"
else
  CUDA_INC=$(cd "$(dirname "$NVCC")/.." && pwd)/include
  [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
  if [ ! -f "$CUDA_INC/cuda_runtime_api.h" ]; then
    echo "FAIL: no cuda_runtime_api.h next to $NVCC nor in /usr/local/cuda/include"
    status=1
  fi
  PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  flags=(-fsyntax-only -std=c++17 -DFPTT_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
         -I csrc/include)
  # -isystem: torch's own warnings are not ours to fix
  while IFS= read -r d; do [ -n "$d" ] && flags+=(-isystem "$d"); done <<<"$TORCH_INC"
  first_torch_inc=$(head -n 1 <<<"$TORCH_INC")
  if [ ! -f "$first_torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    echo "note: $first_torch_inc lacks c10/cuda/impl/cuda_cmake_macros.h (a CPU torch wheel);" \
         "using a one-line stand-in for it"
    mkdir -p "$TMP/shim/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/shim/c10/cuda/impl/cuda_cmake_macros.h"
    flags+=(-isystem "$TMP/shim")
  fi
  if [ ! -d "$first_torch_inc/c10/cuda" ]; then
    echo "SKIPPED glue check: torch's headers have no c10/cuda directory"
  else
    flags+=(-isystem "$CUDA_INC" -isystem "$PY_INC")
    for f in "${glue_files[@]}"; do
      echo "$CXX -fsyntax-only -std=c++17 -DFPTT_WITH_CUDA [torch, CUDA, Python includes] $f"
      if ! "$CXX" "${flags[@]}" "$f"; then
        echo "FAIL: syntax check of $f"
        status=1
      else
        echo "ok:   $f"
      fi
    done
  fi
fi

if [ $status -eq 0 ]; then echo "check_cuda_sources: all checks passed"; else echo "check_cuda_sources: FAILED"; fi
exit $status
