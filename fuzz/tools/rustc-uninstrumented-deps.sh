#!/usr/bin/env bash
# RUSTC_WRAPPER for the fuzz builds (scripts/fuzz.sh sets it): builds the hashing, CRC and
# compression crates without libFuzzer's coverage instrumentation (sancov), every other crate
# as cargo-fuzz asks. Those crates are tools of the targets, not code under test, and
# their byte loops under `-sanitizer-coverage-trace-compares` (a callback per comparison)
# were a third to a half of a receiver_session run. Sanitizer flags (-Zsanitizer) are kept.
#
# Usage (by cargo): rustc-uninstrumented-deps.sh RUSTC ARGS...
set -euo pipefail
rustc=$1
shift
plain=0
prev=
for a in "$@"; do
  if [ "$prev" = --crate-name ]; then
    case "$a" in
      crc32c | xxhash_rust | lz4_flex | zstd | zstd_safe) plain=1 ;;
    esac
    break
  fi
  prev=$a
done
if [ "$plain" = 0 ]; then
  exec "$rustc" "$@"
fi
args=()
for a in "$@"; do
  case "$a" in
    -Cpasses=sancov-module | -Cllvm-args=-sanitizer-coverage-*) ;;
    *) args+=("$a") ;;
  esac
done
exec "$rustc" "${args[@]}"
