#!/usr/bin/env bash
# virtio-blk throughput: HyperCore vs QEMU, same guest (Tests/Guests/virtio.elf in bench mode),
# same raw file, same run. Prints MB/s for sequential 64 KiB reads of the whole disk and
# requests/s for 4 KiB random reads.
#
# Usage: Benchmarks/virtio/run.sh [disk MiB (256)] [queue depth (4)] [random reads (20000)] [repeats (3)]
# Needs: a built hvrun (swift build), gcc/make, qemu-system-x86_64 (optional: skipped if absent).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/Benchmarks/out
mkdir -p "$out"
mib=${1:-256}
depth=${2:-4}
randn=${3:-20000}
repeats=${4:-3}
hvrun=${HVRUN:-$(ls -t "$root"/.build*/release/hvrun "$root"/.build*/debug/hvrun 2>/dev/null | head -1)}
[ -x "$hvrun" ] || { echo "build hvrun first (swift build -c release)"; exit 1; }
make -s -C "$root/Tests/Guests" OUT="$out/guests" >/dev/null
guest=$out/guests/virtio.elf
gcc -O2 -o "$out/tsc" "$root/Benchmarks/virtio/tsc.c"
hz=$("$out/tsc")

disk=$out/disk-${mib}m.img
if [ ! -f "$disk" ] || [ "$(stat -c %s "$disk")" -ne $((mib << 20)) ]; then
	head -c $((mib << 20)) /dev/urandom >"$disk"
fi
cat "$disk" >/dev/null	# both VMMs read from the page cache

value() { sed -n "s/^$1=//p" | tr -d '\r' | tail -1; }

hypercore() {	# cmdline -> "bytes cycles requests"
	local o
	o=$("$hvrun" run --kernel "$guest" --memory 256M --cmdline "$1" --disk "$disk,readonly" --timeout 300 </dev/null 2>&1 || true)
	echo "$(value bench_bytes <<<"$o") $(value bench_cycles <<<"$o") $(value bench_requests <<<"$o")"
}

qemu() {
	local o
	o=$(timeout 300 qemu-system-x86_64 -M q35 -accel kvm -m 256 -nodefaults -nographic -no-reboot -display none \
		-monitor none -serial stdio -device isa-debug-exit,iobase=0x501,iosize=2 -kernel "$guest" -append "$1" \
		-drive "file=$disk,if=none,id=d0,format=raw,readonly=on" -device virtio-blk-pci,drive=d0,disable-legacy=on \
		</dev/null 2>/dev/null | tr -d '\r' | sed 's/^.*Booting from ROM\.\.//' || true)
	echo "$(value bench_bytes <<<"$o") $(value bench_cycles <<<"$o") $(value bench_requests <<<"$o")"
}

best() {	# runs "$@" $repeats times; prints the fastest "bytes cycles requests"
	local bestline="" bestc=0 line c
	for _ in $(seq "$repeats"); do
		line=$("$@")
		c=$(awk '{print $2}' <<<"$line")
		[ -n "$c" ] || continue
		if [ -z "$bestline" ] || [ "$c" -lt "$bestc" ]; then bestline=$line; bestc=$c; fi
	done
	echo "$bestline"
}

seq_cmd="dev=2 bench=1 bs=65536 depth=$depth"
rand_cmd="dev=2 bench=1 bs=4096 depth=$depth rand=1 count=$randn"
have_qemu=0
command -v qemu-system-x86_64 >/dev/null && have_qemu=1

hs=$(best hypercore "$seq_cmd"); hr=$(best hypercore "$rand_cmd")
if [ $have_qemu = 1 ]; then qs=$(best qemu "$seq_cmd"); qr=$(best qemu "$rand_cmd"); else qs=""; qr=""; fi

mbps() { awk -v hz="$hz" '{ if ($2 > 0) printf "%.1f", $1 / ($2 / hz) / 1e6; else printf "-" }' <<<"$1"; }
iops() { awk -v hz="$hz" '{ if ($2 > 0) printf "%.0f", $3 / ($2 / hz); else printf "-" }' <<<"$1"; }

echo "virtio-blk, guest Tests/Guests/virtio.elf, ${mib} MiB raw disk (page cache), queue depth $depth, TSC $(awk -v h="$hz" 'BEGIN{printf "%.3f", h/1e9}') GHz, best of $repeats"
printf '%-34s %14s %14s %8s\n' "" "HyperCore" "QEMU 7.2" "ratio"
s1=$(mbps "$hs"); s2=$( [ -n "$qs" ] && mbps "$qs" || echo -)
r1=$(iops "$hr"); r2=$( [ -n "$qr" ] && iops "$qr" || echo -)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 > 0) printf "%.2fx", a / b; else printf "-" }'; }
printf '%-34s %11s MB/s %9s MB/s %8s\n' "sequential read, 64 KiB requests" "$s1" "$s2" "$(ratio "$s1" "$s2")"
printf '%-34s %12s/s %12s/s %8s\n' "random read, 4 KiB requests" "$r1" "$r2" "$(ratio "$r1" "$r2")"
