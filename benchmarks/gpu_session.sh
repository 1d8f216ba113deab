#!/usr/bin/env bash
# Every GPU check in one short run, for a session that is lent a GPU (device tool): run it from the
# repository root with the project's venv built (bash .ci/run), e.g.
#     bash benchmarks/gpu_session.sh            # results under $OUT (or benchmarks/results/gpu)
# It records the machine, compares NVML with nvidia-smi and torch, runs the GPU-only tests, and the
# accuracy benchmark with device="cuda" (max_memory_allocated, max_memory_reserved against the allocator
# replay, and NVML against each method), and checks that the forked trace leaves a run holding a CUDA
# context and an NCCL group unchanged (benchmarks/gpu_isolation.py).
# Commit what it writes under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
[ -d .venv ] && . .venv/bin/activate
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,memory.free --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import memguard, json; print(json.dumps(memguard.device_memory('cuda').to_dict()))"
} > "$out/machine.txt" 2>&1
timeout 120 python -m pytest -q -p no:cacheprovider tests/device/test_device.py -k real_gpu > "$out/pytest_gpu.txt" 2>&1
timeout 120 python benchmarks/gpu_isolation.py > "$out/isolation_gpu.txt" 2>&1
timeout 420 python benchmarks/accuracy.py --device cuda --output "$out/accuracy_cuda.json" > "$out/accuracy_cuda.txt" 2>&1
echo "exit codes written; see $out"
