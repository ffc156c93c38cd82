#!/usr/bin/env bash
# The GPU-machine runs, one command each: carried wheels, GPU tests, then the benchmarks for MODE.
#   bash scripts/device_run.sh gpu      # issue 3: tests/gpu, bench_gpu.py parts A and B, 60 s steady run
#   bash scripts/device_run.sh stalls   # issue 4: bench_stalls.py (clean + 3 injections, 60 s each)
#   bash scripts/device_run.sh single   # issue 6 on one GPU: bench_mps.py (+ a 1-GPU smoke of bench_scaling)
#   bash scripts/device_run.sh quad     # issue 6 on four GPUs: bench_scaling.py (+ an MPS run on all four)
#   bash scripts/device_run.sh shm      # issue 9: tests/gpu, bench_shm.py table (1 and 2 workers under MPS) + 1-row requests
#   bash scripts/device_run.sh profile  # issue 9: tests/gpu + py-spy profile of the serving thread, frames and shm
#   bash scripts/device_run.sh shm2     # issue 9: bench_shm.py latency at concurrency 1 + 60 s attach/detach steady run
#   bash scripts/device_run.sh export   # issue 10: scripts/export_models.py (bert-tiny, resnet18) into models/ + checks
#   bash scripts/device_run.sh torch    # issue 10: the torch and end-to-end GPU tests (needs nothing exported)
#   bash scripts/device_run.sh limit    # issue 10: in-process limit of both models (bench_torch_limit.py)
#   bash scripts/device_run.sh orch     # issue 10: both models through the orchestrator (bench_real.py) + 60 s steady
#   bash scripts/device_run.sh litserve # issue 10: both models under LitServe (bench_litserve.py)
#   bash scripts/device_run.sh prof     # issue 10: both models with py-spy profiles (worker, client), GPU tests
#   bash scripts/device_run.sh final    # issues 10 and 14: torch tests, both models (bert also 2 workers
#                                       # under MPS), `orchestrator bench` sweeps (scripts/device_bench.sh)
#   bash scripts/device_run.sh cupti    # issue 16: CUPTI journal probe and cost, injection smoke, GPU tests
#   bash scripts/device_run.sh stalls16 # issue 16: launch cost per journal variant, bench_stalls 60 s a scenario
#   bash scripts/device_run.sh stalls16b # issue 16: journal on/off alternated, lazy diagnosis, lazy_module and
#                                       # pinned_alloc; issue 10: bert-tiny with the 60 s steady run
#   bash scripts/device_run.sh rest10   # issue 10: LitServe with 2 and 4 workers, bert-tiny + 60 s steady
#   bash scripts/device_run.sh verify16 # issue 16 on the committed journal: bench_stalls 60 s (clean, clean-own,
#                                       # host_register, lazy_module), then a clean-own/clean pair at 30 s
#   bash scripts/device_run.sh diag16   # issue 16: what CUPTI costs a torch worker: bert-tiny with py-spy on the own
#                                       # journal and CUPTI, CUPTI variants, per-call cost with torch loaded
#   bash scripts/device_run.sh steady10 # issue 10: bert-tiny on the default (own) journal + the 60 s steady run
#   bash scripts/device_run.sh cb16     # issue 16 on the callback journal: probe, bert-tiny own/callback/activity,
#                                       # the CUPTI GPU tests
#   bash scripts/device_run.sh cb16b    # issue 16: the callback journal's cost per call by variant, bert-tiny on
#                                       # callback-driver, its attribution of torch allocations
#   bash scripts/device_run.sh stalls16c # issue 16 on the callback journal: bench_stalls 60 s a scenario, GPU tests
#   bash scripts/device_run.sh final16  # issue 16, the on-demand journal: per-call cost, bench_stalls clean 60 s
#                                       # + 3 alternated clean-own/clean pairs, bert-tiny own vs auto, CUPTI tests
#   bash scripts/device_run.sh rest16   # issue 16: clean, library_alloc, lazy_module 60 s, the GPU tier
#   bash scripts/device_run.sh armed16  # issue 16: probe cost, injections with CUPTI armed from start, clean 40 s
#   bash scripts/device_run.sh steal16  # issue 16: clean and host_register 40 s with the window's steal time
#   bash scripts/device_run.sh heavy16  # issue 16: library_alloc 1 GiB and lazy_module, every 50 ms, 45 s each
#   bash scripts/device_run.sh gputier  # the GPU tier, then host_register 20 s on "auto"
#   bash scripts/device_run.sh ab16     # issue 16: clean-own vs clean with CUPTI armed from start, 40 s each
#   bash scripts/device_run.sh close10  # issue 10 (+16): LitServe 2 and 4 workers, bert-tiny + 60 s steady,
#                                       # bert-tiny on the own journal, the GPU tests
#   bash scripts/device_run.sh real     # issue 10 in one call, most important first, ExportedPrograms only
#                                       # (models/bert-tiny.* carried; AOTInductor packages do not load there)
# Every step runs even when an earlier one failed; its log and exit status go under $OUT; a summary ends it.
# The whole run stays under TOTAL_S seconds (default 560, inside the device's 10-minute limit; 530 for shm modes).
set -x
MODE=${1:-single}
OUT=${OUT:-/tmp/device-out}
RES=/tmp/device-results            # bulky files, sent back as one tarball ($OUT takes at most 8 files)
case $MODE in
    *shm*) TOTAL_S=${TOTAL_S:-530} ;;   # called with a 9-minute limit
    *) TOTAL_S=${TOTAL_S:-560} ;;
esac
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 PATH="$PATH:/usr/local/nvidia/bin"
T0=$SECONDS
SUMMARY=()
FAILED=0

left() { echo $((TOTAL_S - (SECONDS - T0))); }

# budget CAP: seconds a benchmark with a --budget-s option may plan for inside a step of cap CAP
budget() {
    local b=$(( $(left) - 50 ))
    [ "$b" -gt $(( $1 - 30 )) ] && b=$(( $1 - 30 ))
    echo "$b"
}

# step NAME CAP_SECONDS COMMAND...: runs with a timeout of min(CAP, time left - 20 s), logs to $RES/NAME.log
step() {
    local name=$1 cap=$2 t rc start=$SECONDS
    shift 2
    t=$(( $(left) - 20 ))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 10 ]; then
        SUMMARY+=("SKIP  $name (no time left)")
        return 0
    fi
    echo "=== [$name] timeout ${t}s: $*"
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$RES/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("OK    $name ($((SECONDS - start))s)")
    else
        [ "$rc" -eq 124 ] && rc="$rc (timed out)"
        SUMMARY+=("FAIL  $name: exit $rc ($((SECONDS - start))s), log $RES/$name.log")
        FAILED=1
    fi
    return 0
}

mps_processes() {
    ps -eo pid,ppid,stat,args | grep '[n]vidia-cuda-mps' || echo "no MPS processes"
}

step install 120 bash -c 'python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl'
export PYTHONPATH=/tmp/site:$PWD PATH="$PATH:/tmp/site/bin" TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}

step env 60 bash -c 'date -u; uname -a; nproc; python3 -VV
    nvidia-smi
    nvidia-smi --query-gpu=index,name,uuid,driver_version,compute_mode,persistence_mode --format=csv
    nvidia-smi topo -m
    command -v nvidia-cuda-mps-control || ls -l /usr/local/nvidia/bin/nvidia-cuda-mps-*
    grep -m1 "model name" /proc/cpuinfo; df -h /dev/shm /tmp
    python3 -c "import zmq, numpy, psutil, pynvml, msgpack; print(zmq.__version__, numpy.__version__, psutil.__version__)"'
echo "MPS before:"; mps_processes | tee "$RES/mps-before.txt"

# What the CUPTI journal needs: the CUPTI library, the image's (torch brings nvidia-cuda-cupti) else the
# carried 13.0 wheel; and a C compiler for its callback, else the build carried in .shim.
libcupti() {
    python3 -c "from cuda.pathfinder import load_nvidia_dynamic_lib as l; print(l('cupti'))" 2>&1 \
        | tee "$RES/libcupti.txt" | grep -q abs_path \
        || { step install-cupti 60 python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-cupti/*.whl
             export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}; }
    command -v cc gcc clang || export ORCHESTRATOR_CACHE_DIR=$PWD/.shim
}

# litserve_and_steady LS_CAP ORCH_CAP: LitServe with 2 and 4 workers per device (LS_WORKERS), then bert-tiny
# through the orchestrator with the 60 s steady run (issue 10)
litserve_and_steady() {
    mkdir -p "$RES/real"
    for w in ${LS_WORKERS:-2 4}; do
        step "litserve-bert-w$w" "$1" python3 scripts/bench_litserve.py --model bert --models "$PWD/models" \
            --program ep --workers-per-device "$w" --concurrency 1,64 --warmup 2 --duration 8 \
            --json "$RES/real/litserve-bert-w$w.json"
    done
    step orch-bert "$2" python3 scripts/bench_real.py --model bert --concurrency 1,64 --seconds 8 --steady-s 60 \
        --json "$RES/real/orch-bert.json" --logs "$RES/logs-orch-bert"
}

run_mode() {
    case "$1" in
    gpu)
        step gpu-tests 150 python3 -m pytest tests/gpu -q -p no:cacheprovider -o log_cli=true -o log_cli_level=WARNING
        # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
        step bench-gpu 400 python3 scripts/bench_gpu.py --part AB --seconds 4 --clients 8 --in-flight 8 \
            ${GPU_BENCH_ARGS:---steady-seconds 60 --io-threads-variant} --out "$OUT/gpu-bench"
        ;;
    stalls)
        step bench-stalls 340 python3 scripts/bench_stalls.py --out "$OUT/stalls"
        ;;
    single)
        step mps-unit-tests 60 python3 -m pytest tests/unit/test_mps.py -q -p no:cacheprovider
        step bench-mps 330 python3 scripts/bench_mps.py --budget-s $(( $(left) - 110 )) \
            --out "$OUT/bench-mps" --logs "$RES/logs-mps"
        step scaling-smoke 90 python3 scripts/bench_scaling.py --smoke --gpus 0 --seconds 3 --clients-per-gpu 4 \
            --out "$RES/scaling-smoke" --logs "$RES/logs-scaling-smoke"
        ;;
    quad)
        step mps-unit-tests 60 python3 -m pytest tests/unit/test_mps.py -q -p no:cacheprovider
        step bench-scaling 330 python3 scripts/bench_scaling.py --with-mps-run \
            --out "$OUT/bench-scaling" --logs "$RES/logs-scaling"
        ;;
    shm)
        step gpu-tests 120 python3 -m pytest tests/gpu -q -p no:cacheprovider
        # shellcheck disable=SC2086  # SHM_ARGS is a list of options
        step bench-shm 420 python3 scripts/bench_shm.py --parts table,small --budget-s "$(budget 420)" \
            --out "$OUT/shm-table" --logs "$RES/logs-shm" ${SHM_ARGS:-}
        ;;
    profile)
        step gpu-tests 120 python3 -m pytest tests/gpu -q -p no:cacheprovider
        step profile 120 python3 scripts/profile_serving.py --work 762 --seconds 6 --out "$OUT/profile"
        ;;
    shm2)
        # shellcheck disable=SC2086
        step bench-shm2 420 python3 scripts/bench_shm.py --parts latency,steady --budget-s "$(budget 420)" \
            --out "$OUT/shm-latency-steady" --logs "$RES/logs-shm2" ${SHM_ARGS:-}
        ;;
    export)
        # Compiled programs belong to this GPU and torch: written here, kept between calls on a warm machine.
        [ -f models/bert-tiny.pt2 ] || step export-bert 330 python3 scripts/export_models.py --out models --models bert \
            --device cuda --max-batch 256 --seq-max 128
        [ -f models/resnet18.pt2 ] || step export-resnet 330 python3 scripts/export_models.py --out models \
            --models resnet --device cuda --max-batch 64
        step check-exports 120 python3 scripts/check_exports.py models
        ls -la models | tee "$RES/models.txt"
        # The bert programs come back (each under the 16 MiB a returned file may have), to be carried later.
        mkdir -p "$OUT/models" && cp models/bert-tiny.pt2 models/bert-tiny.ep.pt2 models/bert-tiny.json "$OUT/models/" || true
        ;;
    torch)
        step torch-tests 420 python3 -m pytest tests/gpu/test_torch_gpu.py tests/gpu/test_e2e_gpu.py -q \
            -p no:cacheprovider -rs ${TEST_ARGS:-}
        ;;
    gputests)
        step gpu-tests 420 python3 -m pytest tests/gpu -q -p no:cacheprovider -rs
        ;;
    limit)
        mkdir -p "$OUT/real"
        step limit-bert 200 python3 scripts/bench_torch_limit.py --model bert --models models --seconds 3 \
            --json "$OUT/real/limit-bert.json"
        step limit-resnet 200 python3 scripts/bench_torch_limit.py --model resnet --models models --seconds 3 \
            --json "$OUT/real/limit-resnet.json"
        ;;
    orch)
        mkdir -p "$OUT/real"
        # shellcheck disable=SC2086
        step orch-bert 300 python3 scripts/bench_real.py --model bert --concurrency 1,64 --seconds 10 \
            --json "$OUT/real/orch-bert.json" --logs "$RES/logs-orch-bert" ${ORCH_ARGS:-}
        step orch-resnet 200 python3 scripts/bench_real.py --model resnet --concurrency 1,32 --seconds 10 \
            --json "$OUT/real/orch-resnet.json" --logs "$RES/logs-orch-resnet"
        ;;
    litserve)
        mkdir -p "$OUT/real"
        # shellcheck disable=SC2086
        step litserve-bert 240 python3 scripts/bench_litserve.py --model bert --models models --concurrency 1,64 \
            --duration 10 --json "$OUT/real/litserve-bert.json" ${LS_ARGS:-}
        step litserve-resnet 240 python3 scripts/bench_litserve.py --model resnet --models models --concurrency 1,32 \
            --duration 10 --json "$OUT/real/litserve-resnet.json" ${LS_ARGS:-}
        ;;
    real)
        mkdir -p "$OUT/real"
        [ -f models/resnet18.ep.pt2 ] || step export-resnet 90 python3 scripts/export_models.py --out models \
            --models resnet --device cuda --max-batch 64 --no-aoti --no-onnx
        step orch-bert 210 python3 scripts/bench_real.py --model bert --concurrency 1,64 --seconds 8 --steady-s 60 \
            --json "$OUT/real/orch-bert.json" --logs "$RES/logs-orch-bert"
        step limit-bert 90 python3 scripts/bench_torch_limit.py --model bert --models models --program ep \
            --seconds 2 --c1-iters 1000 --json "$OUT/real/limit-bert.json"
        step litserve-bert 120 python3 scripts/bench_litserve.py --model bert --models models --program ep \
            --concurrency 1,64 --warmup 2 --duration 8 --json "$OUT/real/litserve-bert.json"
        step orch-resnet 110 python3 scripts/bench_real.py --model resnet --concurrency 1,32 --seconds 6 \
            --json "$OUT/real/orch-resnet.json" --logs "$RES/logs-orch-resnet"
        step limit-resnet 70 python3 scripts/bench_torch_limit.py --model resnet --models models --program ep \
            --seconds 2 --c1-iters 300 --json "$OUT/real/limit-resnet.json"
        step torch-tests 120 python3 -m pytest tests/gpu/test_torch_gpu.py tests/gpu/test_e2e_gpu.py -q \
            -p no:cacheprovider -rs -k "not aoti and not synthetic and not sigkilled"
        ;;
    prof)
        # Both models through the orchestrator with py-spy on the worker and one client at each point (raw
        # samples in the tarball), then the whole GPU test tier.
        mkdir -p "$OUT/real"
        [ -f models/resnet18.ep.pt2 ] || step export-resnet 90 python3 scripts/export_models.py --out models \
            --models resnet --device cuda --max-batch 64 --no-aoti --no-onnx
        # shellcheck disable=SC2086
        step orch-bert 150 python3 scripts/bench_real.py --model bert --concurrency ${BERT_C:-1,64} --seconds 8 \
            --profile "$RES/prof-bert" --json "$OUT/real/orch-bert.json" --logs "$RES/logs-orch-bert" ${ORCH_ARGS:-}
        step orch-resnet 110 python3 scripts/bench_real.py --model resnet --concurrency 1,32 --seconds 6 \
            --profile "$RES/prof-resnet" --json "$OUT/real/orch-resnet.json" --logs "$RES/logs-orch-resnet"
        # -v: each test's outcome is in the log as it ends, even when the step runs out of time
        step gpu-tests 240 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            ${TEST_ARGS:-}
        ;;
    cupti)
        # Issue 16: CUPTI here, the journal's checks and cost (probe_cupti.py), a short smoke of the new
        # injections, the GPU tests.
        libcupti
        step probe-cupti 150 python3 scripts/probe_cupti.py --out "$OUT/cupti"
        # what `pip install orchestrator[gpu]` takes today (cupti-python 13.4, libcupti 13.5) on this driver
        step probe-cupti-latest 90 bash -c 'python3 -m pip install -q --no-index --no-deps --target /tmp/cupti-latest \
            .whl-cupti/latest/*.whl && PYTHONPATH=/tmp/cupti-latest:$PYTHONPATH \
            LD_LIBRARY_PATH=/tmp/cupti-latest/nvidia/cu13/lib python3 scripts/probe_cupti.py --child basic'
        # shellcheck disable=SC2086
        step stalls-smoke 200 python3 scripts/bench_stalls.py --scenarios ${STALL_SCENARIOS:-clean,host_register,lazy_module} \
            --seconds ${STALL_S:-8} --out "$OUT/stalls-smoke"
        step gpu-tests 240 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        ;;
    stalls16)
        # Issue 16's device run: the journal's launch cost per variant and the lazy-loading diagnosis, then
        # bench_stalls.py at 60 s a scenario (clean with CUPTI and without, and the injections).
        libcupti
        step probe-cost 150 python3 scripts/probe_cupti.py --part cost --out "$OUT/cupti"
        # shellcheck disable=SC2086
        step bench-stalls 480 python3 scripts/bench_stalls.py \
            --scenarios ${STALL_SCENARIOS:-clean,clean-own,host_register,library_alloc,lazy_module} \
            --seconds ${STALL_S:-60} --out "$OUT/stalls"
        ;;
    stalls16b)
        # Issue 16, second run: the journal on and off alternated (30 s each, twice, opposite orders), the
        # lazy-loading diagnosis, lazy_module and pinned_alloc at 60 s, then issue 10's 60 s steady run.
        libcupti
        mkdir -p "$RES/real"
        step probe-lazy 60 python3 scripts/probe_cupti.py --part lazy --out "$OUT/cupti"
        step stalls-pair1 120 python3 scripts/bench_stalls.py --scenarios clean,clean-own --seconds 30 --out "$OUT/pair1"
        step stalls-inject 190 python3 scripts/bench_stalls.py --scenarios lazy_module,pinned_alloc --seconds 60 \
            --out "$OUT/stalls2"
        step stalls-pair2 120 python3 scripts/bench_stalls.py --scenarios clean-own,clean --seconds 30 --out "$OUT/pair2"
        step orch-bert 200 python3 scripts/bench_real.py --model bert --concurrency 1,64 --seconds 8 --steady-s 60 \
            --json "$RES/real/orch-bert.json" --logs "$RES/logs-orch-bert"
        ;;
    rest10)
        # Issue 10's remaining measurements: LitServe tuned (2 and 4 inference workers on the GPU; 1 was
        # measured before), then bert-tiny through the orchestrator with the 60 s steady run.
        litserve_and_steady 150 230
        ;;
    verify16)
        # Issue 16 on the committed journal (CUPTI before the engine, three-try verification, threads moved):
        # the 60 s scenarios, then a pair in the opposite order for the host time a batch.
        libcupti
        step bench-stalls 360 python3 scripts/bench_stalls.py --scenarios clean,clean-own,host_register,lazy_module \
            --seconds 60 --out "$OUT/stalls"
        step stalls-pair 110 python3 scripts/bench_stalls.py --scenarios clean-own,clean --seconds 30 --out "$OUT/pair"
        ;;
    steady10)
        mkdir -p "$OUT/real"
        step orch-bert 170 python3 scripts/bench_real.py --model bert --concurrency 1,64 --seconds 5 --steady-s 60 \
            --json "$OUT/real/orch-bert-steady.json" --logs "$RES/logs-orch-bert"
        ;;
    diag16)
        # Issue 16: bert-tiny's serving thread with CUPTI costs about 110-150 us more a batch than with the own
        # journal (close10). Where it goes (py-spy, both journals), which CUPTI variant (workers/cupti_journal.py
        # VARIANTS) avoids it, per call with torch loaded, and attribution without runtime records.
        libcupti
        mkdir -p "$RES/real"
        for j in own cupti; do
            step "orch-bert-$j" 100 python3 scripts/bench_real.py --model bert --journal "$j" --concurrency 1,64 \
                --seconds 6 --profile "$RES/prof-$j" --json "$RES/real/orch-bert-$j.json" --logs "$RES/logs-bert-$j"
        done
        for v in ${CUPTI_VARIANTS:-activity callback-driver}; do
            step "orch-bert-$v" 80 env ORCHESTRATOR_CUPTI_VARIANT="$v" python3 scripts/bench_real.py --model bert \
                --journal cupti --concurrency 1,64 --seconds 6 --json "$RES/real/orch-bert-$v.json"
        done
        step probe-torchcost 130 python3 scripts/probe_cupti.py --part torchcost --out "$RES/probe"
        step stalls-lib 60 env ORCHESTRATOR_CUPTI_VARIANT=callback-driver python3 scripts/bench_stalls.py \
            --scenarios library_alloc --seconds 20 --out "$RES/stalls-lib"
        ;;
    cb16)
        # Issue 16, the journal on CUPTI's callback API (workers/cupti_callback.c): that it builds here, the
        # probe (another library's calls and their library, lazy loads, per-call cost off / callback /
        # activity / bare), bert-tiny on the own, callback and activity journals, the CUPTI GPU tests, then
        # an own/callback pair at c = 64 in the opposite order.
        libcupti
        step build-callback 60 python3 -c "from workers import cupti_native as n; print(n.compiler(), n.load().path)"
        step probe-cupti 170 python3 scripts/probe_cupti.py --out "$OUT/cupti"
        mkdir -p "$RES/real"
        for j in own callback activity; do
            case $j in own) flag=own ;; *) flag=cupti ;; esac
            step "orch-bert-$j" 90 env ORCHESTRATOR_CUPTI_VARIANT="${j/own/callback}" python3 scripts/bench_real.py \
                --model bert --journal "$flag" --concurrency 1,64 --seconds 6 --json "$RES/real/orch-bert-$j.json" \
                --logs "$RES/logs-bert-$j"
        done
        step gpu-tests-cupti 90 python3 -m pytest tests/gpu/test_cupti_gpu.py -v -p no:cacheprovider -rfEs --tb=short \
            --timeout 80
        for j in callback own; do
            case $j in own) flag=own ;; *) flag=cupti ;; esac
            step "orch-bert-$j-2" 50 python3 scripts/bench_real.py --model bert --journal "$flag" --concurrency 64 \
                --seconds 6 --json "$RES/real/orch-bert-$j-2.json"
        done
        ;;
    cb16b)
        # Issue 16: where the callback journal's cost comes from. Per call: off, callback, callback on the
        # driver functions only, activity, subscribed with nothing enabled (bare); bert-tiny on the own journal
        # and callback-driver; whether callback-driver still names torch's allocations (library_alloc) and
        # host registration, 20 s each; the CUPTI GPU tests.
        libcupti
        step probe-cost 120 python3 scripts/probe_cupti.py --part cost --out "$OUT/cupti"
        mkdir -p "$RES/real"
        for j in callback-driver own; do
            case $j in own) flag=own ;; *) flag=cupti ;; esac
            step "orch-bert-$j" 70 env ORCHESTRATOR_CUPTI_VARIANT="${j/own/callback}" python3 scripts/bench_real.py \
                --model bert --journal "$flag" --concurrency 1,64 --seconds 6 --json "$RES/real/orch-bert-$j.json"
        done
        step stalls-driver-only 110 env ORCHESTRATOR_CUPTI_VARIANT=callback-driver python3 scripts/bench_stalls.py \
            --scenarios library_alloc,host_register --seconds 20 --journal cupti --out "$OUT/stalls-driver-only"
        step gpu-tests-cupti 60 python3 -m pytest tests/gpu/test_cupti_gpu.py -v -p no:cacheprovider -rfEs --tb=short \
            --timeout 50
        ;;
    stalls16c)
        # Issue 16's device run on the callback journal, on demand (monitor.driver_journal = "auto"): per-call
        # cost armed and disarmed, bench_stalls.py at 60 s a scenario (the clean run on the own journal first
        # this time), then the GPU tests.
        libcupti
        step probe-cost 60 python3 scripts/probe_cupti.py --part cost --out "$OUT/cupti"
        # shellcheck disable=SC2086
        step bench-stalls 400 python3 scripts/bench_stalls.py \
            --scenarios ${STALL_SCENARIOS:-clean-own,clean,host_register,library_alloc,lazy_module} \
            --seconds ${STALL_S:-60} --out "$OUT/stalls"
        step gpu-tests 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        ;;
    final16)
        # Issue 16, the journal on demand as committed ("auto": CUPTI untouched until a launch blocks like a
        # lock wait), garbage collections frozen and journaled (STALL_ARGS=--pin as on 2026-12-04, call 5):
        # per-call cost off / armed / never armed / armed late / disarmed; clean 60 s and 3 alternated
        # clean-own/clean pairs of 20 s; bert-tiny on the own journal and "auto"; the CUPTI GPU tests.
        libcupti
        step probe-cost 60 python3 scripts/probe_cupti.py --part cost --out "$OUT/cupti"
        step bench-stalls 300 python3 scripts/bench_stalls.py --scenarios clean --seconds 60 \
            --pairs "${STALL_PAIRS:-3}" --pair-seconds 20 ${STALL_ARGS:-} --out "$OUT/stalls"
        mkdir -p "$RES/real"
        for j in own auto; do
            step "orch-bert-$j" 80 python3 scripts/bench_real.py --model bert --journal "$j" --concurrency 1,64 \
                --seconds 6 --json "$RES/real/orch-bert-$j.json"
        done
        step gpu-tests-cupti 40 python3 -m pytest tests/gpu/test_cupti_gpu.py -v -p no:cacheprovider -rfEs --tb=short \
            --timeout 35
        ;;
    rest16)
        # Issue 16 on the final journal, unpinned: clean and foreign injections at 60 s (the stall records keep the
        # launch probe and the injected operations' windows since e7b348c), then the GPU tier. Call 6 of
        # 2026-12-04 ran STALL_SCENARIOS=clean,host_register,library_alloc (then the default).
        libcupti
        step bench-stalls 240 python3 scripts/bench_stalls.py \
            --scenarios "${STALL_SCENARIOS:-clean,library_alloc,lazy_module}" --seconds 60 --out "$OUT/stalls"
        step gpu-tests 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        ;;
    armed16)
        # Issue 16 with CUPTI armed from start-up (no first stall missed while "auto" arms), after the probe's
        # on-CPU fix: what the probe costs and sees, the three foreign injections at 60 s, clean on "auto" at
        # 40 s (into the tarball), then the GPU tier.
        libcupti
        step probe-cost 60 python3 scripts/bench_probe.py --json "$OUT/probe.json"
        step bench-stalls 280 python3 scripts/bench_stalls.py --journal cupti \
            --scenarios "${STALL_SCENARIOS:-host_register,library_alloc,lazy_module}" --seconds 60 --out "$OUT/stalls"
        step bench-stalls-clean 80 python3 scripts/bench_stalls.py --scenarios clean --seconds 40 \
            --out "$RES/stalls-clean"
        step gpu-tests 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        ;;
    steal16)
        # Issue 16: are the launches that lose 1-5 ms off their CPU with no switch (cpu_stolen) the hypervisor's
        # steal time? clean on "auto" at 40 s, host_register with CUPTI armed from start at 40 s, each with the
        # window's steal and interrupt time from /proc/stat; then the GPU tier.
        libcupti
        step bench-stalls-clean 90 python3 scripts/bench_stalls.py --scenarios clean --seconds 40 --out "$OUT/stalls"
        step bench-stalls-hr 90 python3 scripts/bench_stalls.py --journal cupti --scenarios host_register \
            --seconds 40 --out "$RES/stalls-hr"
        step gpu-tests 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        ;;
    heavy16)
        # Issue 16: library_alloc and lazy_module stall the launches too rarely on these machines (1-7 launches
        # over 1 ms a minute) for a share: 1 GiB through torch and an operation every 50 ms, CUPTI armed from
        # start-up, 45 s each.
        libcupti
        step bench-stalls 200 python3 scripts/bench_stalls.py --journal cupti --scenarios library_alloc,lazy_module \
            --library-mib 1024 --period-ms 50 --seconds 45 --out "$OUT/stalls"
        ;;
    gputier)
        # The GPU tier on the final code, and a 20 s host_register on the default journal ("auto") end to end.
        libcupti
        step gpu-tests 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        step bench-stalls 70 python3 scripts/bench_stalls.py --scenarios host_register --seconds 20 --out "$OUT/stalls"
        ;;
    ab16)
        # Issue 16: does CUPTI, once attached, bring stalls to a clean run? clean-own against clean with CUPTI
        # armed from start-up ("cupti"), 40 s each, unpinned; the records keep the launch's thread probe.
        libcupti
        step bench-stalls 130 python3 scripts/bench_stalls.py --scenarios clean-own,clean --journal cupti \
            --seconds 40 --out "$OUT/stalls"
        ;;
    close10)
        # Issue 10's remaining measurements (LitServe tuned, the 60 s steady run on the default journal) and
        # bert-tiny on the own journal for issue 16's cost on a real model; then the GPU tests.
        libcupti
        litserve_and_steady 110 150
        step orch-bert-own 70 python3 scripts/bench_real.py --model bert --journal own --concurrency 64 --seconds 10 \
            --json "$RES/real/orch-bert-own.json" --logs "$RES/logs-orch-bert-own"
        step gpu-tests 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -rfEs --tb=short --timeout 100 \
            -k "not aoti" ${TEST_ARGS:-}
        ;;
    final)
        # Issue 10 after the batch-growth change (1 worker, and 2 under MPS), the torch tests, and issue 14's
        # `orchestrator bench` sweeps (bert-tiny; synthetic 110 us, pipelined vs depth 1). Most important first.
        mkdir -p "$RES/real" "$RES/bench"
        step torch-tests 100 python3 -m pytest tests/gpu/test_torch_gpu.py tests/gpu/test_e2e_gpu.py -v \
            -p no:cacheprovider -rfEs --tb=short --timeout 90 -k "not aoti"
        step orch-bert 120 python3 scripts/bench_real.py --model bert --concurrency 1,64 --seconds 8 --steady-s 30 \
            --profile "$RES/prof-bert" --json "$RES/real/orch-bert.json" --logs "$RES/logs-orch-bert"
        step orch-bert-mps 80 python3 scripts/bench_real.py --model bert --per-gpu 2 --concurrency 64 --seconds 8 \
            --json "$RES/real/orch-bert-mps.json" --logs "$RES/logs-orch-bert-mps"
        [ -f models/resnet18.ep.pt2 ] || step export-resnet 60 python3 scripts/export_models.py --out models \
            --models resnet --device cuda --max-batch 64 --no-aoti --no-onnx
        step orch-resnet 80 python3 scripts/bench_real.py --model resnet --concurrency 1,32 --seconds 6 \
            --json "$RES/real/orch-resnet.json" --logs "$RES/logs-orch-resnet"
        step bench-bert 90 bash scripts/device_bench.sh bert "$RES/bench" "$RES/logs-bench-bert"
        step bench-synthetic 100 bash scripts/device_bench.sh synthetic "$RES/bench" "$RES/logs-bench-synthetic"
        ;;
    *)
        echo "unknown mode '$1' (gpu, stalls, single, quad, shm, profile, shm2, export, torch, gputests, limit, orch, litserve, real, prof, final, cupti, stalls16, stalls16b, rest10, verify16, close10, diag16, steady10, cb16, cb16b, stalls16c, final16, rest16, ab16)"
        SUMMARY+=("FAIL  mode: unknown '$1'")
        FAILED=1
        ;;
    esac
}

# MODE may list several, comma-separated (e.g. gpu,stalls): they run in order.
IFS=, read -ra MODES <<< "$MODE"
for m in "${MODES[@]}"; do
    run_mode "$m"
done

echo "MPS after:"; mps_processes | tee "$RES/mps-after.txt"
# A daemon the benchmarks started and failed to stop (its temp pipe dir is gone by now): end it by pid.
python3 - <<'EOF' 2>&1 | tee -a "$RES/mps-after.txt"
import os, signal
from orchestrator.supervisor.mps import list_mps_processes
ours = [p for p in list_mps_processes() if p.pipe_dir and p.pipe_dir.startswith(("/tmp/bmps-", "/tmp/bscale-", "/tmp/bshm-"))]
for p in ours:
    print(f"LEAKED {p.role} pid {p.pid} (pipe dir {p.pipe_dir}): SIGKILL")
    os.kill(p.pid, signal.SIGKILL)
print(f"leaked MPS processes: {len(ours)}")
EOF

tar czf "$OUT/device-${MODE//,/-}.tar.gz" -C "$RES" . || SUMMARY+=("FAIL  tar of $RES")
set +x
{
    echo "=== summary: mode $MODE, $((SECONDS - T0))s"
    printf '%s\n' "${SUMMARY[@]}"
    echo "files in $OUT:"; ls -la "$OUT"
} | tee "$OUT/summary.txt"
exit $FAILED
