#!/usr/bin/env bash
# Migrate a 1 GiB KVM guest at several dirty rates, with and without auto-converge, over a
# bandwidth capped at 64 MiB/s, and print total time, downtime and whether it converged.
# Working set 64 MiB; each run is bounded by --timeout-s 30. Usage: scripts/convergence-sweep.sh [rates per vCPU...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p dirtylog-cli
rates=${*:-"500 2000 4000 8000 16000"}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf '%-10s %-6s %-10s %-9s %-12s %-7s %-9s %s\n' rate/vCPU auto status total-ms downtime-ms rounds throttle "dirty pages/s"
for r in $rates; do
  for ac in no yes; do
    flag=""; [ "$ac" = yes ] && flag="--auto-converge"
    target/release/dirtylog demo --dirty-rate "$r" --working-set 64M --max-bandwidth 67108864 \
      --timeout-s 30 $flag --json >"$tmp" 2>/dev/null || true
    python3 - "$r" "$ac" "$tmp" <<'PY'
import json, sys
r, ac, path = sys.argv[1:4]
try:
    d = json.loads(open(path).read().splitlines()[-1])  # the last JSON line: the outcome
except (OSError, IndexError, json.JSONDecodeError):
    d = {}
src = d.get("source", {})
m = src.get("migration", {})
print(f"{r:<10} {ac:<6} {src.get('status', '?'):<10} {m.get('total-time', '-')!s:<9} "
      f"{m.get('downtime', '-')!s:<12} {len(m.get('rounds', [])) or '-'!s:<7} "
      f"{m.get('cpu-throttle-percentage', '-')!s:<9} {m.get('dirty-pages-rate', '-')}")
PY
  done
done
