#!/usr/bin/env bash
# `make under-load [ROUNDS=3]`: the proof that the suites have no timing race. Runs ROUNDS rounds of
# `make test` then `make drills` while two busy loops keep both cores loaded, and prints a Markdown
# table (round, suite, result, pytest's summary, wall time) to paste into RELIABILITY.md.
# Each run's full output goes to build/under-load/round-<n>-<suite>.log. Exits 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
logs=build/under-load
mkdir -p "$logs"

busy=()
stop_busy() {
    for pid in "${busy[@]}"; do kill "$pid" 2>/dev/null; done
    wait "${busy[@]}" 2>/dev/null
}
trap stop_busy EXIT
for _ in 1 2; do
    python3 -c "while True: pass" &
    busy+=($!)
done

echo "Two busy loops (pids ${busy[*]}) on $(nproc) cores; $rounds rounds of make test + make drills."
started=$(date -u '+%Y-%m-%d %H:%M UTC')
rows=()
failed=0
for round in $(seq 1 "$rounds"); do
    for suite in test drills; do
        log="$logs/round-$round-$suite.log"
        begun=$SECONDS
        if make "$suite" >"$log" 2>&1; then result=passed; else result=FAILED; failed=1; fi
        took=$((SECONDS - begun))
        summary=$(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
        row="| $round | make $suite | $result | ${summary:-no pytest summary} | $((took / 60)) min $((took % 60)) s |"
        echo "$row"
        rows+=("$row")
    done
done

echo
echo "Started $started, $(nproc) cores, two busy loops (python3 -c 'while True: pass') running throughout:"
echo
echo "| round | suite | result | pytest summary | wall time |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit "$failed"
