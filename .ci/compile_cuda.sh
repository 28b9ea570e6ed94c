#!/usr/bin/env bash
# Build check of csrc/ that needs no GPU (and no CUDA build of torch):
#   1. every csrc/*.cu compiled by nvcc for sm_80 and sm_90 (one nvcc call per file, one device
#      compilation per arch), warnings as errors;
#   2. every csrc/*.cpp (the torch bindings) syntax-checked by the host compiler against the
#      installed torch's headers plus the CUDA toolkit's, warnings as errors.
# Files are compiled in parallel (-j, default: number of CPUs).  Exit status: 0 all good, 1 a
# build break (the failing command's output is printed), 2 a missing tool (nvcc; or torch for
# step 2 unless --cu-only).
#
# Usage: .ci/compile_cuda.sh [-j N] [--cu-only] [--keep DIR]
# Environment: NVCC (default: nvcc on PATH), CXX (default: g++), PYTHON (default: .venv/bin/python
# if present, else python3), BF_CUDA_ARCHS (default: "80 90").
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc 2>/dev/null || echo 2)
cu_only=0
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j) jobs="$2"; shift 2 ;;
    -j*) jobs="${1#-j}"; shift ;;
    --cu-only) cu_only=1; shift ;;
    --keep) keep="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "compile_cuda.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] || ! [ -x "$NVCC" ]; then
  echo "compile_cuda.sh: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
CXX=${CXX:-g++}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a archs <<< "${BF_CUDA_ARCHS:-80 90}"

shopt -s nullglob
cu_files=(csrc/*.cu)
cpp_files=(csrc/*.cpp)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "compile_cuda.sh: no csrc/*.cu files" >&2
  exit 1
fi

out=${keep:-$(mktemp -d)}
mkdir -p "$out"
[ -n "$keep" ] || trap 'rm -rf "$out"' EXIT

gencode=()
for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
# Same optimisation flags as setup.py; plus warnings as errors for device and host code.
nvcc_flags=(-std=c++17 -O3 --use_fast_math -lineinfo -Werror all-warnings
            -Xcompiler -Wall,-Wextra,-Werror -Icsrc "${gencode[@]}")

arch_label=$(printf 'sm_%s,' "${archs[@]}")
arch_label=${arch_label%,}
cmds=()   # "name<TAB>command" lines, run by xargs -P
for f in "${cu_files[@]}"; do
  base=$(basename "$f" .cu)
  cmds+=("$f (nvcc $arch_label)"$'\t'"$(printf '%q ' "$NVCC" "${nvcc_flags[@]}" -c "$f" -o "$out/$base.o")")
done

if [ "$cu_only" -eq 0 ] && [ ${#cpp_files[@]} -gt 0 ]; then
  if ! torch_inc=$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))' 2>/dev/null); then
    echo "compile_cuda.sh: $PYTHON cannot import torch; needed for the .cpp syntax check (or pass --cu-only)" >&2
    exit 2
  fi
  py_inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  cuda_inc="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)/include"
  if ! [ -f "$cuda_inc/cuda_runtime_api.h" ]; then
    # nvcc may be a wrapper script; ask it where the toolkit lives.
    cuda_inc=$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
    cuda_inc=${cuda_inc%/}
    [ -f "$cuda_inc/cuda_runtime_api.h" ] || cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
  fi
  cxx_flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror)
  while IFS= read -r d; do cxx_flags+=(-isystem "$d"); done <<< "$torch_inc"
  # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU torch wheel lacks the generated
  # c10/cuda/impl/cuda_cmake_macros.h (it only sets build-export macros, irrelevant here).
  cxx_flags+=(-isystem "$py_inc" -isystem "$cuda_inc" -Icsrc -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
              -DTORCH_EXTENSION_NAME=bertforge_C -DTORCH_API_INCLUDE_EXTENSION_H)
  for f in "${cpp_files[@]}"; do
    cmds+=("$f ($CXX -fsyntax-only)"$'\t'"$(printf '%q ' "$CXX" "${cxx_flags[@]}" "$f")")
  done
fi

start=$(date +%s)
# Each job writes its log and an .ok/.fail marker; xargs runs up to $jobs at once.
printf '%s\n' "${cmds[@]}" | awk -F'\t' '{print NR "\t" $0}' > "$out/jobs.tsv"
export out
run_one() {
  local id="$1" name="$2" cmd="$3" t0 t1
  t0=$(date +%s)
  if bash -c "$cmd" > "$out/job$id.log" 2>&1; then
    t1=$(date +%s); echo "ok    $name ($((t1 - t0))s)"; touch "$out/job$id.ok"
  else
    t1=$(date +%s); echo "FAIL  $name ($((t1 - t0))s)"; touch "$out/job$id.fail"
  fi
}
export -f run_one
while IFS=$'\t' read -r id name cmd; do printf '%s\0%s\0%s\0' "$id" "$name" "$cmd"; done < "$out/jobs.tsv" |
  xargs -0 -n 3 -P "$jobs" bash -c 'run_one "$@"' _

status=0
while IFS=$'\t' read -r id name cmd; do
  if [ -e "$out/job$id.fail" ] || ! [ -e "$out/job$id.ok" ]; then
    status=1
    echo "===== $name failed:"
    echo "$cmd"
    cat "$out/job$id.log" 2>/dev/null || true
  fi
done < "$out/jobs.tsv"
echo "compile_cuda.sh: ${#cmds[@]} compile jobs, $(( $(date +%s) - start ))s wall, -j $jobs: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
