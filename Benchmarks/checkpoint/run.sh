#!/usr/bin/env bash
# Checkpoint pause and total time, apply, delete (merge) per GiB vs qemu-img commit, and
# export/import vs cp -r, in one run (see checkpoint.py).
#
#   Benchmarks/checkpoint/run.sh [checkpoint.py options]
#
# Environment: HVRUN (default .build-static/release/hvrun, the fully static release build:
# Scripts/install.sh --build-only), DISK_TOOL (default .build/release/disk-test-tool, built here
# if missing), MEMORY (default 512,2048), MERGE_MIB (1024), REPEAT (3), WORKDIR.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
hvrun=${HVRUN:-$root/.build-static/release/hvrun}
[ -x "$hvrun" ] || { echo "no hvrun at $hvrun (Scripts/install.sh --build-only, or set HVRUN)" >&2; exit 1; }
tool=${DISK_TOOL:-$root/.build/release/disk-test-tool}
[ -x "$tool" ] || (cd "$root" && swift build -c release --product disk-test-tool >&2)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
make -s -C "$root/Tests/Guests" OUT="$out" "$out/stateful.elf" >&2
python3 "$here/checkpoint.py" --hvrun "$hvrun" --disk-tool "$tool" --guest "$out/stateful.elf" \
	--memory "${MEMORY:-512,2048}" --merge-mib "${MERGE_MIB:-1024}" --repeat "${REPEAT:-3}" \
	${WORKDIR:+--workdir "$WORKDIR"} --table "$@"
