#!/usr/bin/env bash
# Save/restore of the running stateful guest, HyperCore's hvrun and QEMU 7.2
# side by side in one run (interleaved per repeat, same guest and command line).
#
#   Benchmarks/snapshot/run.sh [snapshot.py options]
#
# Defaults: hvrun at 512 MiB, 2 GiB and 8 GiB, QEMU at 512 MiB and 2 GiB
# (QEMU_MEMORY=512,2048,8192 adds QEMU at 8 GiB), 0 and 32 MiB touched,
# 3 repeats. Environment: HVRUN (default .build-static/release/hvrun, the
# fully static release build:
#   binary Scripts/install.sh builds: Scripts/install.sh --build-only),
# MEMORY, QEMU_MEMORY, TOUCH, REPEAT, GUESTS_OUT (where stateful.elf is built;
# default a temporary directory), WORKDIR (snapshots and logs; default a
# temporary directory under TMPDIR, removed).
#
# stdout: one JSON line per measurement (see snapshot.py); stderr at the end:
# a Markdown table of medians, QEMU/hvrun ratios and the goals.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
hvrun=${HVRUN:-$root/.build-static/release/hvrun}
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)" >&2; exit 1; }
[ -x "$hvrun" ] || { echo "no hvrun at $hvrun (build it, or set HVRUN)" >&2; exit 1; }
if [ -n "${GUESTS_OUT:-}" ]; then
	out=$GUESTS_OUT
else
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
fi
make -s -C "$root/Tests/Guests" OUT="$out" "$out/stateful.elf" >&2
python3 "$here/snapshot.py" --vmm qemu,hvrun --hvrun "$hvrun" --guest "$out/stateful.elf" \
	--memory "${MEMORY:-512,2048,8192}" --qemu-memory "${QEMU_MEMORY:-512,2048}" \
	--touch "${TOUCH:-0,32}" --repeat "${REPEAT:-3}" ${WORKDIR:+--workdir "$WORKDIR"} --table "$@"
