#!/usr/bin/env bash
# One call of a GPU lease: everything a session with a lent GPU (the `device` tool; an H100 or
# H200, no network, the machine's own python3 with torch, transformers, nvcc and ninja but no
# DeepSpeed or webdataset) must measure (CUDA kernel parity and bandwidth, GPU training
# throughput, activation-checkpointing memory), as three calls of at most ~9, ~9 and ~6 minutes:
#
#   bash bench/gpu_session.sh kernels
#       JIT-builds the bertforge_C extension from csrc/ (sm_90 unless TORCH_CUDA_ARCH_LIST says
#       otherwise), runs tests/ops on the GPU with the extension required (BERTFORGE_CUDA_EXT=1),
#       then bench/kernels.py.  Leaves env.txt, build.log, bertforge_C.so, ops_tests.log,
#       kernels.log and kernels.md under $OUT.
#   [LENGTHS_FROM=SHARD_DIR] bash bench/gpu_session.sh train [MODELS] [SEQ_LENS] [VARIANTS]
#       `python -m pretrain bench` on the GPU (default: large, 128, default,ops,packing,
#       ops+packing+compile, with the HF peer), JSON and table under $OUT.  Carry the
#       bertforge_C.so of the kernels call as .gpu_build/bertforge_C.so to skip the rebuild.
#       The packing variants pack each step's instances as training does (data.packing: the same
#       instances in fewer rows).  On the synthetic lengths (long documents, ~92% of the slots
#       real) there is little to pack; LENGTHS_FROM, a shard directory carried to the device,
#       gives the instances its train split's lengths instead (`--lengths-from`; reading them
#       needs numpy and zstandard, not webdataset or DeepSpeed) and tags the outputs with its
#       name.  Build the bundled demo corpus's (short documents) on the CPU machine beforehand,
#       one per sequence length (~1 MB each, a few seconds; demo_out/ is git-ignored, so carry it):
#           python -m data_prep run --config configs/data/demo.yaml --out demo_out/lengths-128 --no-progress
#           python -m data_prep run --config configs/data/demo.yaml --out demo_out/lengths-512 \
#               --seq-len 512 --max-predictions 80 --no-progress
#       then, e.g., LENGTHS_FROM=demo_out/lengths-512/shards bash bench/gpu_session.sh train large 512.
#       Give SEQ_LENS the shards' seq_len: longer instances are clipped to the bench's seq_len,
#       and shards of a shorter seq_len hold no instance longer than it.
#
#   bash bench/gpu_session.sh memory [MODEL] [SEQ_LEN] [MICRO_BATCHES]
#       bench/activation_memory.py (training.activation_checkpointing off and on; default: base,
#       512, "8 16 32", bf16): peak memory (torch.cuda.max_memory_allocated) and step time per micro
#       batch, and the largest micro batch each way within 40 GiB (the process limited to it, searched
#       until out of memory); a third call, ~5 minutes.  Leaves memory_MODEL_SEQ.md under $OUT (docs/performance.md, "Activation
#       checkpointing", gets its table).
#
# Then, on the CPU machine: docs/benchmarks.md gets the tables with device and date (`python -m
# pretrain bench --from-json ... --markdown docs/benchmarks.md`; docs/performance.md, "GPU").
# Without a GPU it runs the same steps in smoke mode (tiny shapes, the CPU preset), so CI can check
# that the script itself works: tests/test_gpu_session_script.py.
set -uo pipefail
stage=${1:-kernels}
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT" .gpu_build
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/.gpu_build:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.gpu_build/ext" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    smoke=0; require_ext=1
else
    smoke=1; require_ext=""  # no GPU: check the script, not the kernels
    echo "gpu_session: no CUDA device; smoke mode (timings meaningless)"
fi

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
    "$py" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
    command -v nvcc >/dev/null && nvcc --version | tail -n 1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0

case "$stage" in
kernels)
    timeout 420 "$py" - <<'EOF' 2>&1 | tee "$OUT/build.log"
import time
t = time.time()
import pretrain.ops._ext as ext
module = ext.load_extension()
print(f"extension: {ext._status} ({time.time() - t:.0f} s)")
if module is not None:
    print("loaded from", module.__file__)
EOF
    so=$(find .gpu_build -name 'bertforge_C*.so' 2>/dev/null | head -n 1)
    [ -n "$so" ] && cp "$so" "$OUT/bertforge_C.so"
    BERTFORGE_CUDA_EXT=$require_ext timeout 300 "$py" -m pytest -q -p no:cacheprovider tests/ops \
        > "$OUT/ops_tests.log" 2>&1 || status=1
    tail -n 15 "$OUT/ops_tests.log"
    smoke_flag=(); [ "$smoke" = 1 ] && smoke_flag=(--smoke)
    BERTFORGE_CUDA_EXT=$require_ext timeout 180 "$py" bench/kernels.py "${smoke_flag[@]}" \
        --markdown "$OUT/kernels.md" > "$OUT/kernels.log" 2>&1 || status=1
    tail -n 40 "$OUT/kernels.log"
    ;;
train)
    models=${2:-large}; seqs=${3:-128}; variants=${4:-default,ops,packing,ops+packing+compile}
    if [ "$smoke" = 1 ]; then
        args=(--preset cpu --models tiny --seq-lens 128 --variants default,packing --micro-batch 4 --rounds 1
              --warmup 1 --steps 1 --sweep none)
    else
        args=(--preset gpu --models "$models" --seq-lens "$seqs" --variants "$variants")
    fi
    tag="${models//,/_}_${seqs//,/_}"
    if [ -n "${LENGTHS_FROM:-}" ]; then
        args+=(--lengths-from "$LENGTHS_FROM")
        name=$(basename "${LENGTHS_FROM%/}"); [ "$name" = shards ] && name=$(basename "$(dirname "${LENGTHS_FROM%/}")")
        tag="${tag}_${name}"
    fi
    timeout 540 "$py" -m pretrain bench "${args[@]}" --json "$OUT/train_$tag.json" \
        --markdown "$OUT/train_$tag.md" > "$OUT/train_$tag.log" 2>&1 || status=1
    tail -n 30 "$OUT/train_$tag.log"
    ;;
memory)
    model=${2:-base}; seq=${3:-512}; micro=${4:-8 16 32}
    if [ "$smoke" = 1 ]; then
        args=(--model tiny --seq-len 64 --micro 2 4 --steps 1 --budget-gb 0.1)
    else
        args=(--model "$model" --seq-len "$seq" --micro $micro --precision bf16 --budget-gb 40)
    fi
    timeout 360 "$py" bench/activation_memory.py "${args[@]}" > "$OUT/memory_${model}_$seq.md" 2>&1 || status=1
    tail -n 20 "$OUT/memory_${model}_$seq.md"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh kernels | [LENGTHS_FROM=SHARD_DIR] bash bench/gpu_session.sh train [MODELS] [SEQ_LENS] [VARIANTS] | bash bench/gpu_session.sh memory [MODEL] [SEQ_LEN] [MICRO_BATCHES]" >&2
    exit 2
    ;;
esac
echo "gpu_session: stage $stage finished with status $status; outputs in $OUT"
exit $status
