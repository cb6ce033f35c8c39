#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests and the GPU benchmark, results under $OUT.
#
#   bash benchmarks/gpu_check.sh --wheels   # here, with the package registry: wheels of what a GPU machine
#                                           # without the internet lacks, into .whl/ (ignored by git; carry it)
#   bash benchmarks/gpu_check.sh            # on the GPU machine: about 7 minutes on one H200
#   bash benchmarks/gpu_check.sh --smoke    # the same steps on a CPU machine (the tests dry-run on the CPU,
#                                           # gpu.py --smoke): how this script is checked without a GPU
#
# Writes into $OUT (default: a new temporary folder): versions.txt, nvidia-smi.txt, pytest.txt (the
# summary of tests/test_cuda.py and tests/test_host_reads.py), gpu_table.md (benchmarks/gpu.py's table)
# and summary.txt. Exits non-zero if a step failed; every step runs under its own time limit so the
# whole stays within 8 minutes and the files of the steps that finished come back.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-}"
WHEELS=("hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4")  # as pyproject.toml

if [ "$MODE" = "--wheels" ]; then
    # The GPU machine has torch, torchvision, tensorboard, tqdm, numpy, pillow and pytest, not Hydra.
    # Pure-Python wheels serve any Python 3; antlr4-python3-runtime (Hydra's parser) is published as a
    # source archive only, so it is built into a wheel here.
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}" &&
        python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 &&
        ls .whl
    exit $?
fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
start=$(date +%s)
status=0
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# 1. What the README installs, as far as this machine lacks it: from .whl/ when there is one
#    (a machine without the internet), else from the package registry.
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/segtrain-site .whl/*.whl &&
            export PYTHONPATH="$PYTHONPATH:/tmp/segtrain-site"
    else
        python3 -m pip install -q "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4"
    fi
fi
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import datetime, platform, sys
import torch, torchvision, hydra, omegaconf
print("date (UTC):", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
print("python:", sys.version.split()[0], platform.machine())
print("torch:", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("torchvision:", torchvision.__version__, "hydra-core:", hydra.__version__, "omegaconf:", omegaconf.__version__)
print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")
EOF
{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt"
cat "$OUT/versions.txt"
if ! grep -q "^torch:" "$OUT/versions.txt"; then
    say "install: FAILED (see versions.txt)"
    exit 1
fi

# 2. The CUDA tests (on a CPU machine with --smoke: the same tests, dry-run on the CPU).
if [ "$MODE" = "--smoke" ]; then
    export SEGTRAIN_CUDA_DRY_RUN=1
    bench_args=(--smoke)
else
    bench_args=(--workers 4 --rounds 3)
fi
timeout 300 python3 -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py tests/test_host_reads.py 2>&1 | tee "$OUT/pytest.txt"
tests=${PIPESTATUS[0]}
say "tests: exit $tests ($(tail -n 1 "$OUT/pytest.txt"))"
[ "$tests" -eq 0 ] || status=1

# 3. The GPU table: segtrain against the plain loop, per precision / channels_last / compile.
timeout 210 python3 benchmarks/gpu.py "${bench_args[@]}" 2>&1 | tee "$OUT/gpu_table.md"
bench=${PIPESTATUS[0]}
say "benchmarks/gpu.py: exit $bench"
[ "$bench" -eq 0 ] || status=1

say "gpu_check: $(( $(date +%s) - start )) s, exit $status, results in $OUT"
exit $status
