#!/usr/bin/env bash
# Boots every PVH guest on QEMU (KVM) and checks its output lines and exit
# status: QEMU is the reference the HyperCore integration tests agree with.
# Usage: qemu-check.sh [OUT]   (guests are built into OUT, default ./out)
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:-$here/out}")
make -s -C "$here" OUT="$out" >/dev/null || exit 1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

# run LIMIT_S GUEST QEMU_ARGS...: boots GUEST; sets $status and $output.
# machine=… before it picks another machine type than q35, accel=… another accelerator than KVM.
run() {
	local limit=$1 guest=$2
	shift 2
	current=$guest
	${prefix:-} timeout "$limit" qemu-system-x86_64 -M "${machine:-q35}" -accel "${accel:-kvm}" -m 128 -nodefaults \
		-nographic -no-reboot -display none -monitor none -serial stdio \
		-device isa-debug-exit,iobase=0x501,iosize=2 \
		-kernel "$out/$guest" "$@" >"$tmp/out" 2>"$tmp/err" </dev/null
	status=$?
	# SeaBIOS prints before the guest, without a newline after its last word.
	output=$(tr -d '\r' <"$tmp/out" | sed 's/^.*Booting from ROM\.\.//')
}

fail() {
	echo "FAIL $current: $*"
	sed 's/^/    | /' <<<"$output"
	failures=$((failures + 1))
}

# expect STATUS PATTERN...: every glob PATTERN must match a whole output line.
expect() {
	local want=$1 pattern line found
	shift
	[ "$status" -eq "$want" ] || { fail "exit status $status, want $want"; return; }
	for pattern in "$@"; do
		found=
		while IFS= read -r line; do
			# shellcheck disable=SC2053 # glob match on purpose
			[[ $line == $pattern ]] && { found=1; break; }
		done <<<"$output"
		[ -n "$found" ] || { fail "no line matching '$pattern'"; return; }
	done
	echo "ok   $current"
}

# QEMU exits with (v << 1) | 1 for a debug-exit write of v, and 0 on reset.
qexit() { echo $((($1 << 1) | 1)); }

run 30 default.elf -append "console=ttyS0 hello"
expect 0 "Hello from HyperCore guest" "cpu_vendor=?*" "cpuid_max_leaf=0x*" \
	"mem_total=[1-9]*" "mem_mib=12[0-9]" "memmap_entries=[1-9]*" \
	"cmdline=console=ttyS0 hello" "bye"

printf '\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\xff\xfe' >"$tmp/initrd"
run 30 pvhinfo.elf -append "root=/dev/vda quiet" -initrd "$tmp/initrd"
expect "$(qexit 0x31)" "magic=0x336ec578" "version=1" "cmdline=root=/dev/vda quiet" \
	"memmap=0x0,0x9fc00,1" "memmap=0x100000,0x*,1" "memmap_entries=*" "modules=1" \
	"module0=0x*,0x12" "module0_head=000102030405060708090a0b0c0d0e0f"

run 30 pvhinfo.elf
expect "$(qexit 0x31)" "magic=0x336ec578" "cmdline=" "modules=0"

run 30 uart.elf
expect "$(qexit 0x32)" "scr=0x5a,0xa5" "lcr_dlab=0x83" "divisor=0x0c,0x00" "lcr=0x03" \
	"ier=0x0f,0x00" "iir_nofifo=0x01" "iir_fifo=0xc1" "iir_thri=0xc2,0xc1" \
	"lsr_idle=0x60" "mcr_loop=0x1f" "msr_loop=0x00,0x90,0xf0" "lsr_loop=0x61" \
	"loop_rx=0x41,0x42" "lsr_drained=0x60"

run 30 reset.elf
expect 0 "resetting"

run 30 exit.elf -append "code=42"
expect "$(qexit 42)" "code=42"

run 30 exit.elf -append "code=0x7"
expect "$(qexit 7)" "code=7"

run 30 exit.elf
expect "$(qexit 0x7f)" "error=need code=0..255"

run 8 spin.elf
expect 124 "spinning"

run 30 mmio.elf -append "mmio=0xd0000000"
expect "$(qexit 0x33)" "mmio=0xd0000000" "read32=0x0" "read64=0x0"

run 30 exc.elf
expect "$(qexit 0x36)" "ud=1" "de=1"

# Instructions KVM's emulator lacks at CPL0 on PVM hosts, which HyperCore completes; QEMU with
# KVM would stop on them here too, so TCG is the reference. Multi-threaded TCG takes QEMU's atomic
# cmpxchg16b path, whose #PF error code has the write bit as hardware sets it for a locked
# read-modify-write (single-threaded TCG loads first and reports 0x0).
accel=tcg,thread=multi run 30 emul.elf -smp 2
expect "$(qexit 0x42)" "bp=2" "bp_rip=after_int3+1" "fwait=ok" "nm=1" "cas_ok=1" \
	"cas_ok_mem=0xaaaabbbbccccdddd,0xeeeeffff00001111" "cas_fail=1" \
	"cas_fail_loaded=0xaaaabbbbccccdddd,0xeeeeffff00001111" "cas_fail_mem=0xaaaabbbbccccdddd,0xeeeeffff00001111" \
	"pf=1" "pf_cr2=0x100000000" "pf_error=0x2" "gp=2" "gp_error=0x0" \
	"pair_after=0xaaaabbbbccccdddd,0xeeeeffff00001111,0x0"
accel=tcg,thread=multi run 30 emul.elf -smp 2 -append "cpus=2 n=2000"
expect "$(qexit 0x42)" "bp=2" "cas_ok=1" "smp_count=4000" "smp_consistent=1"

run 60 piobench.elf -append "n=20000"
expect 0 "n=20000" "cycles=[1-9]*" "cycles_per_exit=[1-9]*"

run 30 smp.elf -append "cpus=1"
expect "$(qexit 0x35)" "cpus=1" "bsp_apic_id=0" "aps=0"

run 60 smp.elf -smp 2 -append "cpus=2"
expect "$(qexit 0x35)" "cpus=2" "bsp_apic_id=0" "aps=1" "ap_apic_id=1"

run 60 smp.elf -smp 4 -append "cpus=4"
expect "$(qexit 0x35)" "cpus=4" "aps=3" "ap_apic_id=1" "ap_apic_id=2" "ap_apic_id=3"

# The virtio driver against QEMU's devices (HyperCore's tests compare the two line by line).
python3 -c "import sys; sys.stdout.buffer.write(bytes((i // 512 * 13 + i % 512) & 255 for i in range(2048 * 512)))" >"$tmp/disk.img"
blk="-drive file=$tmp/disk.img,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=hypercore-disk"
run 30 virtio.elf -append "dev=2" $blk
expect "$(qexit 0x40)" "transport=pci" "capacity=2048" "verify=ok" "flush=0" "id=hypercore-disk" "out_of_range=1" \
	"last_read=0" "unsupported=2" "inflight=ok" "indirect=0" "zeroed=1" "status=0xf"
run 30 virtio.elf -append "dev=2 irq=1" $blk
expect "$(qexit 0x40)" "verify=ok" "inflight=ok" "interrupts=yes" "status=0xf"
run 30 virtio.elf -append "dev=4 irq=1" -device virtio-rng-pci,disable-legacy=on
expect "$(qexit 0x40)" "rng_bytes=64,64" "rng_random=yes"
run 30 virtio.elf -append "dev=3" -device virtio-serial-pci,disable-legacy=on -chardev null,id=c0 -device virtconsole,chardev=c0
expect "$(qexit 0x40)" "console_tx=ok" "status=0xf"

# The save/restore guest: the same steps and result as HyperCore, on both transports.
# expect_steps N: the step lines are exactly step=1..N in order; con_steps FILE N: so is hvc0's output.
expect_steps() {
	[ "$(grep '^step=' <<<"$output" | tr '\n' ' ')" = "$(seq -f 'step=%g' -s ' ' 1 "$1") " ] || fail "step lines are not step=1..$1"
}
con_steps() {
	[ "$(tr -d '\r' <"$1" | tr '\n' ' ')" = "$(seq -f 'con step=%g' -s ' ' 1 "$2") " ] || fail "hvc0 got $(wc -l <"$1") lines, not con step=1..$2"
}
run 30 stateful.elf -append "steps=12"
expect "$(qexit 0x41)" "stateful steps=12 cpus=1 blk=0 con=0" "pages_ok=12" "uart_irqs=12" "result=0x89d9f4fdda1cc4ab"
expect_steps 12
truncate -s 64K "$tmp/stateful.img"
sblk="-drive file=$tmp/stateful.img,if=none,id=s0,format=raw"
run 60 stateful.elf -smp 4 -append "steps=12 blk=1 con=1 cpus=4" $sblk -device virtio-blk-pci,drive=s0,disable-legacy=on \
	-device virtio-serial-pci,disable-legacy=on -chardev file,id=c0,path="$tmp/hvc0" -device virtconsole,chardev=c0
expect "$(qexit 0x41)" "stateful steps=12 cpus=4 blk=1 con=1" "pages_ok=12" "disk_ok=12" "uart_irqs=12" "aps_ok=3" \
	"result=0x6fa6cc2ab491adeb"
expect_steps 12
con_steps "$tmp/hvc0" 12
rm -f "$tmp/hvc0"
machine=microvm,acpi=off run 60 stateful.elf -smp 2 -global virtio-mmio.force-legacy=false \
	-append "steps=12 blk=1 con=1 cpus=2 mmio=1" $sblk -device virtio-blk-device,drive=s0 \
	-device virtio-serial-device -chardev file,id=c0,path="$tmp/hvc0" -device virtconsole,chardev=c0
expect "$(qexit 0x41)" "stateful steps=12 cpus=2 blk=1 con=1" "disk_ok=12" "uart_irqs=12" "aps_ok=1" "result=0x6fa6cc2ab491adeb"
expect_steps 12
con_steps "$tmp/hvc0" 12
run 30 stateful.elf -append "steps=4 touch=32"
expect "$(qexit 0x41)" "touch=32" "pages_ok=4" "touched_ok=8192" "result=0x*"

# virtio-net on a TAP, inside a network namespace this script creates (bridge 10.211.0.1/24 + TAP)
# and deletes: no packet leaves it. Needs root, /dev/net/tun and ip; skipped otherwise.
if [ "$(id -u)" = 0 ] && [ -w /dev/net/tun ] && command -v ip >/dev/null; then
	ns=hcnet-qemu-$$
	trap 'ip netns del "$ns" 2>/dev/null; rm -rf "$tmp"' EXIT
	ip netns add "$ns" && ip -n "$ns" link set lo up && ip -n "$ns" link add hcbr0 type bridge &&
		ip -n "$ns" addr add 10.211.0.1/24 dev hcbr0 && ip -n "$ns" link set hcbr0 up &&
		ip -n "$ns" tuntap add dev hctap0 mode tap vnet_hdr && ip -n "$ns" link set hctap0 master hcbr0 &&
		ip -n "$ns" link set hctap0 up || fail "cannot set up the test network namespace"
	tap="-netdev tap,id=n0,ifname=hctap0,script=no,downscript=no,vhost=off"
	prefix="ip netns exec $ns" run 60 net.elf -append "ip=10.211.0.2 peer=10.211.0.1 count=3" $tap \
		-device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56
	expect "$(qexit 0x42)" "mac=52:54:0:12:34:56" "mtu=1500" "link=up" "reply seq=1" "reply seq=2" "reply seq=3" "pings_ok=3"
	machine=microvm,acpi=off prefix="ip netns exec $ns" run 60 net.elf -global virtio-mmio.force-legacy=false \
		-append "ip=10.211.0.2 peer=10.211.0.1 count=3 mmio=1" $tap -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56
	expect "$(qexit 0x42)" "link=up" "pings_ok=3"
	ip -n "$ns" link del hctap0; ip netns del "$ns"
else
	echo "skipped net.elf: needs root, /dev/net/tun and ip (it creates a network namespace)"
fi

if [ "$failures" -ne 0 ]; then
	echo "$failures check(s) failed"
	exit 1
fi
echo "all guests behave on QEMU"
