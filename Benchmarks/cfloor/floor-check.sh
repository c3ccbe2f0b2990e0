#!/usr/bin/env bash
# Runs the test guests on the C floor and on QEMU and compares their output
# and exit status. Lines that describe the machine rather than the guest
# (memory map, memory size, CPUID leaves, cycle counts) are left out of the
# comparison. uart.elf is not run: the floor's UART is THR and LSR only.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
guests=$root/Tests/Guests/out
floor=$root/Benchmarks/out/floor
make -s -C "$root/Tests/Guests" OUT="$guests" >/dev/null || exit 1
make -s -C "$root/Benchmarks/cfloor" OUT="$root/Benchmarks/out" || exit 1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
volatile='^(memmap|memmap_entries|mem_total|mem_mib|cpuid_max_leaf|cycles|cycles_per_exit)='
failures=0

# compare GUEST CMDLINE LIMIT_S
compare() {
	local guest=$1 cmdline=$2 limit=$3 fstatus qstatus
	timeout "$limit" "$floor" "$guests/$guest" "$cmdline" >"$tmp/floor" 2>&1 </dev/null
	fstatus=$?
	timeout "$limit" qemu-system-x86_64 -M q35 -accel kvm -m 128 -nodefaults -nographic \
		-no-reboot -display none -monitor none -serial stdio \
		-device isa-debug-exit,iobase=0x501,iosize=2 \
		-kernel "$guests/$guest" -append "$cmdline" >"$tmp/qemu" 2>/dev/null </dev/null
	qstatus=$?
	# QEMU reports a debug exit v as (v << 1) | 1; the floor as v.
	[ "$qstatus" -ne 0 ] && [ "$qstatus" -ne 124 ] && qstatus=$((qstatus >> 1))
	tr -d '\r' <"$tmp/qemu" | sed 's/^.*Booting from ROM\.\.//; /SeaBIOS/d' | grep -Ev "$volatile" >"$tmp/q"
	grep -Ev "$volatile" "$tmp/floor" >"$tmp/f"
	if [ "$fstatus" -eq "$qstatus" ] && diff -u "$tmp/q" "$tmp/f" >"$tmp/diff"; then
		echo "same $guest '$cmdline' (status $fstatus, $(wc -l <"$tmp/f") lines)"
	else
		echo "DIFF $guest '$cmdline': floor status $fstatus, QEMU $qstatus"
		sed 's/^/    /' "$tmp/diff"
		failures=$((failures + 1))
	fi
}

compare default.elf "console=ttyS0 hello" 30
compare pvhinfo.elf "root=/dev/vda quiet" 30
compare reset.elf "" 30
compare exit.elf "code=42" 30
compare exit.elf "" 30
compare spin.elf "" 8
compare mmio.elf "mmio=0xd0000000" 30
compare exc.elf "" 30
compare piobench.elf "n=20000" 60
compare smp.elf "cpus=1" 30

[ "$failures" -eq 0 ] && echo "the floor runs every guest as QEMU does" || exit 1
