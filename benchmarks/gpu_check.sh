#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one call on a machine with no network:
# build the extension (CUDA kernels included), run the GPU tests, run the benchmarks.
# Writes gpu_check.log, the GPU tests' junit XML and one JSON per benchmark under $OUT
# (default benchmarks/results/local). Each step has its own time limit, so one slow step
# cannot eat the others' time.
#   bash benchmarks/gpu_check.sh                 # everything
#   STEPS="build tests ddpm" bash benchmarks/gpu_check.sh
#   QUICK=1 bash benchmarks/gpu_check.sh         # fewer benchmark shapes, no torch.compile
#   PROBES=0 bash benchmarks/gpu_check.sh        # without the tuning probes (tools/probes.py) in the benchmarks
#   TILES=1 STEPS="build conv_transpose conv2d tuning" bash benchmarks/gpu_check.sh   # + the tile probes (a compile
#                                                 # per tile and case: a run of its own); the table keeps the winners
#   PROFILE_CASES=gn-16x256x64-nhwc-triton STEPS=profile bash benchmarks/gpu_check.sh   # ncu counters
# All default steps take 12-13 minutes; on a machine whose calls are capped at 10, run three calls on the
# same warm machine (the build stays): STEPS="build diagnose tests", then
# STEPS="group_norm conv_transpose conv2d tuning host profile" (time limits 120 + 150 + 150 + 60 + 60 s), then
# STEPS="models model_profile" (150 + 120 s; MODELS_LIMIT=400 for every case, torch.compile of each model
# included).
#   CONV2D_CASES="context module" bash benchmarks/gpu_check.sh   # some of the conv2d benchmark's cases
#   MODELS_CASES="ddpm_unet sampling" bash benchmarks/gpu_check.sh   # some of the whole-model benchmark's models
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
# Default: the steps above (three calls where calls are capped at 10 minutes; the DDPM step, issue 2, is
# measured: add "ddpm sweep").
STEPS=${STEPS:-"build diagnose tests group_norm conv_transpose conv2d models model_profile tuning host profile"}
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
limit() { local s=$1; shift; timeout --kill-after=10 "$s" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "TIMED OUT after ${s}s: $*"; return $rc; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if want build; then
  step "build (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise)"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  build() { limit 300 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . ; }
  if ! build; then
    echo "BUILD FAILED"; status=1
    if [ -n "${FALLBACK_SKIP:-}" ]; then
      step "build again without the CUDA kernels of: $FALLBACK_SKIP"
      VLFAST_SKIP_CUDA=$FALLBACK_SKIP build || echo "BUILD FAILED AGAIN"
    fi
  fi
  $PY -m vlfast info
fi

if want diagnose; then
  step "diagnose: a failing TORCH_CHECK in the extension (CPU tensors)"
  ldd vlfast/_C*.so | grep -E "gomp|stdc|c10|torch" || true
  env | grep -iE "^(LD|C|CXX|CPP)FLAGS=" || true
  $PY -c "import sysconfig as s; print('LDSHARED:', s.get_config_var('LDSHARED')); print('LDCXXSHARED:', s.get_config_var('LDCXXSHARED'))"
  reject=$(mktemp --suffix=.py)
  cat > "$reject" <<'PYEOF'
import torch, vlfast._C
x, coef = torch.randn(2, 3, 4, 4), torch.rand(12, 8)
try:
    torch.ops.vlfast.ddpm_step_kernel(x, x, None, None, coef, None, 0, None, float("inf"), 1,
                                      False, 0, 0, None, False, False)
except RuntimeError as e:
    print("raised RuntimeError as it should:", str(e).splitlines()[0])
PYEOF
  limit 30 $PY "$reject"; rc=$?; echo "exit code $rc"
  if [ $rc -ne 0 ] && command -v cuda-gdb >/dev/null; then
    limit 60 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY "$reject" 2>&1 \
      | grep -vE "^\[(New|Thread|Detaching)" | grep -E "^#|raised|signal|SIG|gomp|stdc|_C|c10" | head -60
  fi
fi

if want tests; then
  step "GPU tests"
  xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  # TEST_FILES / TEST_K narrow the run (e.g. to the ops changed since the last GPU run).
  limit "${TEST_LIMIT:-170}" $PY -m pytest -q -p no:cacheprovider "${xdist[@]}" -k "${TEST_K:-cuda or rejects or format_numbers or each_kernel or triton_backward or dropin or blocks}" ${TEST_FILES:-tests/} \
    --junitxml="$OUT/gpu_tests.xml" -o junit_family=xunit1 || status=1
fi

quick=(); [ -n "${QUICK:-}" ] && quick=(--no-compile)
# Tuning probes (tools/probes.py: forced paths, tile configs) beside the user's rows; the tuning step keeps the
# knobs a backend won with.
probes=(--probes); [ "${PROBES:-1}" = 0 ] && probes=()
[ -n "${TILES:-}" ] && export VLFAST_TILE_PROBES=1
if want group_norm; then
  step "benchmark: group_norm"
  limit "${GN_LIMIT:-120}" $PY benchmarks/bench_group_norm.py --json "$OUT/group_norm.json" "${quick[@]}" "${probes[@]}" \
    || status=1
fi
if want conv_transpose && [ -f benchmarks/bench_conv_transpose.py ]; then
  step "benchmark: conv_transpose2d"
  limit "${CONV_LIMIT:-150}" $PY benchmarks/bench_conv_transpose.py --json "$OUT/conv_transpose.json" "${quick[@]}" "${probes[@]}" \
    || status=1
fi
if want conv2d && [ -f benchmarks/bench_conv2d.py ]; then
  # Cases in order of importance, the bf16 channels_last layout first: a run cut by the limit keeps those rows.
  step "benchmark: conv2d"
  limit "${CONV2D_LIMIT:-150}" $PY benchmarks/bench_conv2d.py --json "$OUT/conv2d.json" "${quick[@]}" "${probes[@]}" \
    ${CONV2D_CASES:+--cases $CONV2D_CASES} || status=1
fi
if want models && [ -f benchmarks/bench_models.py ]; then
  # Cases in order of importance (the DDPM U-Net's forward, its compiled rows, the sampling loop first): a run
  # cut by the limit keeps those rows.
  step "benchmark: models"
  limit "${MODELS_LIMIT:-150}" $PY benchmarks/bench_models.py --json "$OUT/models.json" "${quick[@]}" \
    ${QUICK:+--quick} ${MODELS_CASES:+--models $MODELS_CASES} || status=1
fi
if want model_profile; then
  # The per-layer profile of the DDPM U-Net (eager, converted, compiled; forward and training step) and its figure,
  # the README's picture of a GPU run.
  step "profile: ddpm_unet per layer"
  limit "${MODEL_PROFILE_LIMIT:-120}" $PY -m vlfast profile ddpm_unet --batch 64 --backward --compile --quiet \
    --json "$OUT/profile_ddpm_unet.json" --plot "$OUT/profile_ddpm_unet.png" || status=1
fi
if want ddpm; then
  step "benchmark: ddpm step"
  limit "${DDPM_LIMIT:-150}" $PY benchmarks/bench_ddpm.py --json "$OUT/ddpm.json" ${QUICK:+--quick} ${DDPM_QUICK:+--quick} "${quick[@]}" || status=1
fi
if want sweep; then
  step "sweep: ddpm tiles"
  limit 90 $PY tools/sweep_ddpm.py --json "$OUT/sweep_ddpm.json" || status=1
fi

if want tuning; then
  # auto by measurement: the table of this card's winners from the op benchmarks above (vlfast.tuning). Commit it
  # as vlfast/tuning/<card>.json (the file name `python -m vlfast tuning show --table` prints) to ship it.
  step "tuning table from this run's benchmarks"
  results=()
  for f in group_norm conv_transpose conv2d ddpm; do [ -f "$OUT/$f.json" ] && results+=("$OUT/$f.json"); done
  if [ ${#results[@]} -gt 0 ]; then
    limit 60 $PY -m vlfast tuning build "${results[@]}" -o "$OUT/tuning.json" || status=1
  else
    echo "no benchmark JSON in $OUT: run the op benchmarks first"
  fi
fi

if want host; then
  step "host time per call (back-to-back calls, one sync)"
  limit 60 $PY tools/host_overhead.py --json "$OUT/host_overhead.json" || status=1
fi

if want profile && command -v ncu >/dev/null; then
  step "profile: hardware counters of the kernels in question (ncu, clocks left alone)"
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
  metrics+=,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
  metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size
  metrics+=,launch__block_size,lts__t_sector_hit_rate.pct,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum
  metrics+=,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum
  limit "${PROFILE_LIMIT:-60}" ncu --profile-from-start off --clock-control none --nvtx --csv --page raw \
    --metrics "$metrics" --log-file "$OUT/ncu.csv" $PY tools/profile_kernels.py ${PROFILE_CASES:+--cases "$PROFILE_CASES"} \
    || status=1
  $PY tools/profile_kernels.py --summarize "$OUT/ncu.csv" || true
fi

step "done, status $status"
exit $status
