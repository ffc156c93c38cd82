#!/usr/bin/env bash
# `orchestrator bench` sweeps on the GPU machine (issue 14), called by scripts/device_run.sh final:
#   bash scripts/device_bench.sh synthetic OUT LOGS  # configs/gpu-shm.toml at 110 us, pipelined (depth 3) vs depth 1
#   bash scripts/device_bench.sh bert OUT LOGS       # configs/gpu-bert.toml (models/bert-tiny.ep.pt2), seq 128
# Each starts its orchestrator(s) in a fresh run directory, sweeps, stops them and keeps their logs in LOGS.
set -u
WHAT=$1 OUT=$2 LOGS=$3
TMP=$(mktemp -d /tmp/dbench-XXXX)
mkdir -p "$OUT" "$LOGS"
ORCH="python3 -m orchestrator.cli"  # the repository's package, as a user would run `orchestrator`

# variant SRC NAME DEST [KEY=VALUE...]: SRC with its own name and run directory, model path made absolute,
# and [pipeline] keys overridden
variant() {
    python3 - "$@" <<'PY'
import sys, tomllib, tomli_w
from pathlib import Path
src, name, dest, *sets = sys.argv[1:]
raw = tomllib.loads(Path(src).read_text())
raw["orchestrator"]["name"] = name
raw["orchestrator"]["run_dir"] = str(Path(dest).parent / name)
if "path" in raw["model"]:
    raw["model"]["path"] = str((Path(src).parent / raw["model"]["path"]).resolve())
for kv in sets:
    k, v = kv.split("=")
    raw["pipeline"][k] = int(v)
Path(dest).write_text(tomli_w.dumps(raw))
PY
}

stop_all() {
    for c in "$TMP"/*.toml; do $ORCH stop "$c" >/dev/null 2>&1; done
    for d in "$TMP"/*/; do cp -r "$d" "$LOGS/" 2>/dev/null; done
}
trap stop_all EXIT

case $WHAT in
    synthetic)
        variant configs/gpu-shm.toml bench-pipelined "$TMP/pipelined.toml"
        variant configs/gpu-shm.toml bench-depth1 "$TMP/depth1.toml" depth=1
        $ORCH start "$TMP/pipelined.toml" --detach || exit 1
        $ORCH start "$TMP/depth1.toml" --detach || exit 1
        $ORCH bench "$TMP/pipelined.toml" --compare "$TMP/depth1.toml" --concurrency 1,4,16,64 --rows 64 \
            --processes 4 --duration 3 --warmup 1 \
            --json "$OUT/synthetic-110us.json" --csv "$OUT/synthetic-110us.csv"
        ;;
    bert)
        variant configs/gpu-bert.toml bench-bert "$TMP/bert.toml"
        $ORCH start "$TMP/bert.toml" --detach || exit 1
        $ORCH bench "$TMP/bert.toml" --concurrency 1,4,16,64 --rows 16 --dim seq=128 --processes 8 \
            --duration 3 --warmup 1 --json "$OUT/bert-tiny.json" --csv "$OUT/bert-tiny.csv"
        rc=$?
        $ORCH status "$TMP/bert.toml" --once > "$OUT/status-bert.txt" 2>&1  # placement: each process's cores
        exit $rc
        ;;
    *) echo "device_bench.sh: unknown sweep '$WHAT' (synthetic, bert)" >&2; exit 2 ;;
esac
