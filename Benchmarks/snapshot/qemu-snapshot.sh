#!/usr/bin/env bash
# Save/restore timing of QEMU (Debian's qemu-system-x86_64, 7.2) on the
# stateful test guest: the peer HyperCore's snapshots are compared with.
#
#   Benchmarks/snapshot/qemu-snapshot.sh [snapshot.py options]
#     --memory 512,2048   guest RAM sizes in MiB (default)
#     --touch 32          MiB the guest writes once at start (stateful.elf touch=)
#     --repeat 3          measurements per combination
#
# One JSON line per measurement on stdout:
#   {"vmm":"qemu","memory_mib":512,"touched_mib":32,"save_ms":…,"file_bytes":…,"restore_ms":…,…}
# save = QMP stop + migrate "exec:cat > FILE" until query-migrate says completed;
# restore = a new QEMU with -incoming "exec:cat FILE" + QMP cont, from its
# process start until the guest prints its next step= line. See snapshot.py.
#
# The HyperCore side: `snapshot.py --vmm hvrun --hvrun PATH` (class HvrunVmm);
# both side by side, with a table of medians and ratios: run.sh.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)" >&2; exit 1; }
# The guest is built into GUESTS_OUT, or a temporary directory removed at the end.
if [ -n "${GUESTS_OUT:-}" ]; then
	out=$GUESTS_OUT
else
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
fi
make -s -C "$root/Tests/Guests" OUT="$out" "$out/stateful.elf" >&2
python3 "$here/snapshot.py" --vmm qemu --guest "$out/stateful.elf" "$@"
