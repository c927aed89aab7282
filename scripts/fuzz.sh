#!/usr/bin/env bash
# Run a cargo-fuzz target for a while: scripts/fuzz.sh TARGET|all SECONDS [libFuzzer args...]
#
# E.g. until 10^7 executions or an hour, whichever comes first, at low priority:
#   FUZZ_SANITIZER=none nice -n 19 scripts/fuzz.sh receiver_session 3600 -runs=10000000
#
# Targets: wire_decoder receiver_session vcpu_blob core_clear_ring (see fuzz/src/*.rs).
# Needs nightly Rust and cargo-fuzz (`cargo install cargo-fuzz`). One process per target
# (-jobs=1 in effect: 2 shared cores), run one after the other for `all`. New inputs go to
# fuzz/work/corpus/TARGET (not committed), the committed seeds in fuzz/corpus/TARGET are read
# too; crashes land in fuzz/artifacts/TARGET/ — turn each into a regression test (and copy it
# into fuzz/corpus/TARGET so the CI replay runs it).
#
# Prints, per target: executions, executions per second, crashes (artifact files).
# Environment: FUZZ_SANITIZER (address, the default, or none), FUZZ_TOOLCHAIN (nightly).
set -euo pipefail

targets=(wire_decoder receiver_session vcpu_blob core_clear_ring)
if [ $# -lt 2 ]; then
  echo "usage: $0 TARGET|all SECONDS [libFuzzer args...]  (targets: ${targets[*]})" >&2
  exit 2
fi
target=$1
seconds=$2
shift 2
case "$seconds" in
  '' | *[!0-9]*) echo "error: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;;
esac
if [ "$target" = all ]; then
  run=("${targets[@]}")
else
  case " ${targets[*]} " in
    *" $target "*) run=("$target") ;;
    *) echo "error: unknown target '$target' (${targets[*]} or all)" >&2; exit 2 ;;
  esac
fi

cd "$(dirname "$0")/../fuzz"
toolchain=${FUZZ_TOOLCHAIN:-nightly}
sanitizer=${FUZZ_SANITIZER:-address}
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
  echo "error: cargo-fuzz is missing: cargo install cargo-fuzz (and rustup toolchain install nightly)" >&2
  exit 1
fi
# One build per sanitizer, each in its own target directory, so switching costs no rebuild.
# The hashing, CRC and compression crates are built without coverage instrumentation (see
# fuzz/tools/rustc-uninstrumented-deps.sh); cargo does not fingerprint the wrapper, hence
# directories of their own.
export RUSTC_WRAPPER="$PWD/tools/rustc-uninstrumented-deps.sh"
build=(--sanitizer "$sanitizer" --target-dir "target/fuzz-$sanitizer")
cargo "+$toolchain" fuzz build "${build[@]}"

status=0
summary=()
for t in "${run[@]}"; do
  mkdir -p "work/corpus/$t" "corpus/$t" "artifacts/$t"
  log="work/$t.log"
  before=$(find "artifacts/$t" -type f | wc -l)
  echo "== $t for ${seconds}s (log: fuzz/$log)"
  set +e
  cargo "+$toolchain" fuzz run "${build[@]}" "$t" "work/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix="artifacts/$t/" "$@" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  if [ -z "$execs" ]; then
    # Ended by a crash: libFuzzer prints no final stats, take the last status line.
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  fi
  after=$(find "artifacts/$t" -type f | wc -l)
  crashes=$((after - before))
  line="$t: ${execs:-0} executions in ${took:-?} s, ${rate:-?} exec/s, $crashes crash(es), exit $rc (sanitizer $sanitizer)"
  echo "$line"
  summary+=("$line")
  if [ "$crashes" -gt 0 ] || [ "$rc" -ne 0 ]; then
    status=1
    grep -m5 -E "panicked|ERROR: |SUMMARY" "$log" || true
    ls -t "artifacts/$t" | head -3 | sed "s#^#  fuzz/artifacts/$t/#"
  fi
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
