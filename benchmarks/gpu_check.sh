#!/usr/bin/env bash
# Everything jaxnet claims on an NVIDIA GPU, in one call of at most 9.5 minutes, on a machine with JAX (CUDA) and
# PyTorch (CUDA) installed but no network. Writes one results file, ready to append to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh prepare      # here, with network: the wheels and data to carry, in .gpu-carry/
#   bash benchmarks/gpu_check.sh [OUT_DIR]    # on the GPU machine (OUT_DIR default: $OUT, else gpu-check-out)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # the same steps at CPU sizes, to check the script itself
#   GPU_CHECK_ONLY=hour [GPU_CHECK_EPOCHS="12 40"] bash benchmarks/gpu_check.sh [OUT_DIR]
#                                             # instead of steps 2-6: the hour's recipe for each number of epochs
#
# Carried (.gpu-carry/, 64 MiB at most): the wheels of what the device image (JAX, flax, optax, orbax, PyTorch)
# may lack — ml-collections, tensorboardX, tqdm, pillow, matplotlib (jaxnet's imports), chex, pytest,
# pytest-timeout, pytest-xdist (the tests), with their dependencies but chex's JAX — and the JPEG copy of CIFAR-10.
# Those the image has are left as they are.
# Steps, each with its own time limit, each one's outcome a line of the results file:
#   1. the machine: nvidia-smi, jax's devices, versions
#   2. the GPU-side tests not yet seen passing there (all of tests/test_conv.py and tests/test_train.py passed
#      on 2026-12-04 but the oneDNN refusal, fixed after; `GPU_CHECK_TESTS=all` runs those two files whole)
#   3. time to accuracy: the record's `muon` recipe (bf16 by its dtype "auto") against the PyTorch record script
#      on the GPU (bf16 autocast), after a warm-up run of each, 3 seeds interleaved (benchmarks.time_to_accuracy);
#      each run's phases (data, setup, train, checkpoints, test, finish) from its summary
#   4. one more warm `muon` run under cProfile: jaxnet's functions by cumulative time (where setup goes)
#   5. every conv impl against the reference on the models' layer shapes, fp32 and bf16; a user's model's train
#      step per impl; a jax export made on the CPU run on the GPU (python -m benchmarks.gpu_check)
#   6. FastNet's train step against PyTorch eager (bf16 autocast), bf16 jaxnet (benchmarks.train_step)
# Steps run in that order of importance; their limits add up to 9.5 minutes (the tests took 13 s of their 110).
# The calls of 2026-12-04 (H200) started in ~30 s. Without XLA's autotuning (`--xla_gpu_autotune_level=0`) the
# `muon` recipe's step took ~5 s, not 6.7 ms: steps 5 and 6 did not finish within their limits with it or without.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
WHEELS="ml-collections tensorboardX tqdm pillow matplotlib pytest pytest-timeout pytest-xdist toolz"
NO_DEPS="chex"  # its other dependencies are JAX's, or above

if [ "${1:-}" = prepare ]; then
    set -e
    mkdir -p "$CARRY/wheels"
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$CARRY/wheels" $WHEELS
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$CARRY/wheels" $NO_DEPS
    rm -f "$CARRY"/wheels/numpy-*  # JAX's own dependency, in the image: 16 MB of the 64 the carry may hold
    cp "${CIFAR10:-../shared/data/cifar10/cifar10-jpeg.tar.gz}" "$CARRY/cifar10-jpeg.tar.gz"
    du -sh "$CARRY"
    exit 0
fi

OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_check.md"
LOG="$OUT_DIR/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-}

step() {  # step NAME LIMIT_S COMMAND...: run it, log its output, record its outcome and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 124 ] && verdict="timed out after ${limit} s" || { [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"; }
    echo "- $name: $verdict, $((SECONDS - t0)) s" | tee -a "$RESULTS"
}

echo "## GPU check — $(date -u +%Y-%m-%d)" >"$RESULTS"
echo >>"$RESULTS"
: >"$LOG"
if [ -d "$CARRY/wheels" ]; then
    $PY -m pip install -q --no-index --find-links "$CARRY/wheels" $WHEELS >>"$LOG" 2>&1 &&
        $PY -m pip install -q --no-index --no-deps --find-links "$CARRY/wheels" $NO_DEPS >>"$LOG" 2>&1 ||
        echo "- installing the carried wheels failed (see the log)" >>"$RESULTS"
fi
DATA=${CIFAR10:-$CARRY/cifar10-jpeg.tar.gz}
[ -f "$DATA" ] || DATA=../shared/data/cifar10/cifar10-jpeg.tar.gz

{
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
    $PY -c 'import jax, jaxlib, flax, optax, torch; print("devices:", jax.devices()); print("jax", jax.__version__,
"jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
"torch cuda:", torch.cuda.is_available())' 2>&1
    echo '```'
} >>"$RESULTS"

if [ "${GPU_CHECK_ONLY:-}" = hour ]; then
    # Instead of the steps above: issue 19's question that a GPU answers in minutes and 2 CPU cores in hours — how
    # many epochs the `hour` recipe (airbench96's net with `quick`'s recipe; 12.1 epochs fitted the hour on a Zen 4,
    # 92.52 % with TTA, two seeds) needs on the JPEG copy for 93 % with TTA (docs/performance.md: 2.5-5 times the
    # hour's 1.04 PFLOP by the published records' accuracy per FLOP). Its first run autotunes the net's convs.
    HOUR=(time_budget=0)
    [ -n "$DRY" ] && HOUR=(time_budget=0 "widths=(8, 16, 16)" batch_size=100 train_subset=200 test_subset=100)
    for epochs in ${GPU_CHECK_EPOCHS:-12 40}; do
        step "the hour's recipe for $epochs epochs" 240 $PY -m benchmarks.time_to_accuracy --config hour --seeds 0 \
            --data-dir "$DATA" --workdir "$OUT_DIR/hour$epochs" --no-record "${HOUR[@]}" epochs=$epochs
    done
elif [ -n "$DRY" ]; then
    step "tests (conv, train step)" 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_conv.py -k "pallas and across"
    step "time to accuracy against the PyTorch record" 300 $PY -m benchmarks.time_to_accuracy --config muon \
        --seeds 0 --data-dir "$DATA" --peer torch_record --workdir "$OUT_DIR/tta" --no-record epochs=1.0 \
        batch_size=100 train_subset=200 test_subset=100
    step "impls against the reference, a user's train step, a CPU-made export" 300 \
        $PY -m benchmarks.gpu_check --small --out "$OUT_DIR/checks.md"
    step "train steps against PyTorch (bf16)" 300 $PY -m benchmarks.train_step --models plain32 --steps 3 \
        --dtype bfloat16 --conv-impl xla --torch-modes eager,eager-bf16 --no-record
    step "recipe smoke (stands in for muon), with a profile" 300 $PY -m experiments.cifar10 --config smoke \
        --workdir "$OUT_DIR/run" --data-dir "$DATA" --profile "$OUT_DIR/profile"
    step "a warm smoke run under cProfile" 300 $PY -m cProfile -o "$OUT_DIR/run.prof" -m experiments.cifar10 \
        --config smoke --workdir "$OUT_DIR/run-prof" --data-dir "$DATA"
else
    # The suite runs on the CPU unless JAX_PLATFORMS says otherwise (tests/conftest.py). fp32 convs on a GPU run
    # TF32 unless told: the tests compare with a float32 reference to 1e-4. cuDNN's weight gradients differ in the
    # last bit from call to call unless XLA is told to be deterministic (the purity test compares two calls bit for
    # bit). Eight workers share the GPU, so none may take 75 % of its memory at start.
    if [ "${GPU_CHECK_TESTS:-}" = all ]; then TESTS=(tests/test_conv.py tests/test_train.py); else
        TESTS=(tests/test_conv.py::test_onednn_off_the_cpu_says_so_in_one_line_even_outside_jit
               tests/test_lowering.py::test_a_refused_branch_called_outside_jit_raises_the_same_one_line_error); fi
    step "tests on the GPU (${GPU_CHECK_TESTS:-the oneDNN refusals})" 110 env JAX_PLATFORMS=cuda,cpu \
        JAX_DEFAULT_MATMUL_PRECISION=highest XLA_FLAGS=--xla_gpu_deterministic_ops=true \
        XLA_PYTHON_CLIENT_PREALLOCATE=false $PY -m pytest -v -n 8 -p no:cacheprovider "${TESTS[@]}"
    # The warm-up runs fill the caches (jaxnet's first run autotuned for 95 s on 2026-12-04, then 2 s cached).
    step "time to accuracy against the PyTorch record" 300 $PY -m benchmarks.time_to_accuracy --config muon \
        --seeds 0,1,2 --warmup --data-dir "$DATA" --peer torch_record --peer-dtype bfloat16 --peer-device cuda \
        --workdir "$OUT_DIR/tta" --no-record
    # One more warm `muon` run under cProfile: where its setup's seconds go (4.1 s a run on 2026-12-04, not broken
    # down there; on a CPU: the model's init, the step's trace, its compilation, the example batches).
    step "a warm muon run under cProfile" 60 $PY -m cProfile -o "$OUT_DIR/run.prof" -m experiments.cifar10 \
        --config muon --workdir "$OUT_DIR/run" --data-dir "$DATA"
    # Its 64 conv programs did not compile in 110 s with XLA's autotuning; without it they ran too slowly for 60 s.
    step "impls against the reference, a user's train step, a CPU-made export" 90 \
        $PY -m benchmarks.gpu_check --out "$OUT_DIR/checks.md"
    # 2026-12-04: fastnet and resnet18 with torch.compile did not finish in 110 s, nor fastnet alone in 95 s.
    step "train steps against PyTorch (bf16)" 30 $PY -m benchmarks.train_step --models fastnet \
        --steps 7 --dtype bfloat16 --conv-impl auto --torch-modes eager-bf16 --no-record
fi

{
    echo
    sed -n '/^jaxnet, `muon`:/,/^jaxnet \/ peer/p' "$LOG"
    echo
    sed -n '/^Where jaxnet.s time went/,/^| jaxnet |/p' "$LOG"
    echo
    [ -f "$OUT_DIR/checks.md" ] && cat "$OUT_DIR/checks.md"
    echo
    echo "Train steps (bf16 jaxnet; PyTorch's best of its modes):"
    echo
    grep '^| ' "$LOG" | grep -E 'resnet18|fastnet|plain32|^\| model' | sort -u
    echo
    for run in "$OUT_DIR/tta/jaxnet-warmup" "$OUT_DIR/run" "$OUT_DIR"/hour*/jaxnet-seed0; do
        [ -f "$run/summary.json" ] || continue
        $PY - "$run/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: {s['config']['model']} / {s['dtype']}, XLA_FLAGS `{s['xla_flags']}`: test "
      f"{s['test_accuracy']:.4f}, TTA {s['test_accuracy_tta']:.4f}; wall {s['wall_seconds']:.1f} s, train "
      f"{s['train_seconds']:.1f} s, compile {s['compile_seconds'] or 0:.1f} s, {s['images_per_second'] or 0:.0f} img/s; "
      f"phases {', '.join(f'{k} {v:.1f}' for k, v in s['phase_seconds'].items())}, "
      f"checkpoints {s['checkpoint_seconds']:.2f} s")
EOF
    done
    $PY -m jaxnet.profiling summarize "$OUT_DIR/profile" --top 12 2>/dev/null | sed 's/^/    /'
    if [ -f "$OUT_DIR/run.prof" ]; then
        echo
        echo "The warm run under cProfile: jaxnet's functions by cumulative seconds"
        echo
        $PY -c 'import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats("cumulative").print_stats("jaxnet/", 30)' \
            "$OUT_DIR/run.prof" 2>&1 | sed -n '/ncalls/,$p' | sed 's/^/    /'
        echo "and JAX's lowering, compilation and compilation cache:"
        echo
        $PY -c 'import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats("cumulative").print_stats(
            "jax/_src/(compiler|compilation_cache|interpreters/mlir|stages).py:[0-9]+[(](compile_or_get_cached|"
            "get_executable_and_time|backend_compile.*|lower_jaxpr_to_module|compile|lower)[)]", 12)' \
            "$OUT_DIR/run.prof" 2>&1 | sed -n '/ncalls/,$p' | sed 's/^/    /'
    fi
} >>"$RESULTS" 2>&1
echo "results: $RESULTS (log: $LOG)"
