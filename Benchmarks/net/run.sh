#!/usr/bin/env bash
# Network benchmark (issue 11): the same guest (Tests/Guests/net.elf) on HyperCore and on QEMU's
# virtio-net (tap backend, vhost=off), both on one internal switch made by `hvrun switch create`,
# all inside a network namespace this script creates and deletes (no traffic leaves it).
#   guest → host: the guest sends N UDP datagrams of 1472 bytes (1500-byte IP packets, 1514-byte
#                 frames) to the host's address; a receiver on the host counts them and times the
#                 first to the last arrival.
#   host → guest: the host sends N such datagrams as fast as it can; the guest counts those that
#                 reach it and times first to last with its TSC (converted with the host's TSC
#                 rate, the same for both VMMs).
#   ping:         `ping -c 20 -i 0.05` from the host to the guest (guest in its answering loop).
# BATCH=B runs the guest's batched driver path (`batch=B`: frames written once, one notification
# per B frames sent or per drain of received ones) so that the VMMs, not the emulated guest's
# copies, set the pace; BATCH=0 (the default) is the plain copy-per-frame driver.
# Usage: Benchmarks/net/run.sh [N] [ROUNDS]   (root; needs ip, dnsmasq not needed, python3, qemu)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-2000}
ROUNDS=${2:-2}
HVRUN=${HVRUN:-$PWD/.build-static/release/hvrun}
BATCH=${BATCH:-0}
extra=""
[ "$BATCH" = 0 ] || extra=" batch=$BATCH"
GUEST=${GUEST:-$PWD/.build/test-guests/net.elf}
[ "$(id -u)" = 0 ] || { echo "needs root (network namespace, bridge, taps)"; exit 1; }
for tool in ip python3 qemu-system-x86_64; do command -v $tool >/dev/null || { echo "needs $tool"; exit 1; }; done
[ -x "$HVRUN" ] && [ -f "$GUEST" ] || { echo "build first: Scripts/install.sh --build-only; make -C Tests/Guests OUT=\$PWD/.build/test-guests"; exit 1; }

NS=hcbench-$$
HOME_DIR=$(mktemp -d /tmp/hvrun-netbench-XXXXXX)
cleanup() { ip netns del "$NS" 2>/dev/null || true; rm -rf "$HOME_DIR"; }
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
IN=(ip netns exec "$NS")
"${IN[@]}" env HVRUN_HOME="$HOME_DIR" "$HVRUN" switch create bench --type internal --address 10.33.0.1/24 >/dev/null
BRIDGE=$("${IN[@]}" env HVRUN_HOME="$HOME_DIR" "$HVRUN" switch info bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bridge"])')
"${IN[@]}" ip tuntap add dev hcqtap0 mode tap vnet_hdr
"${IN[@]}" ip link set hcqtap0 master "$BRIDGE" up
TSC_MHZ=$(awk -F: '/^cpu MHz/ {print $2; exit}' /proc/cpuinfo)

# The host's side: receive N datagrams on 10.33.0.1:9 (or until 5 s of silence), print count and seconds.
receiver() {
	"${IN[@]}" python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("10.33.0.1", 9)); s.settimeout(30)
n = int(sys.argv[1]); count = 0; first = last = 0.0
try:
    while count < n:
        s.recv(2048); now = time.monotonic()
        if count == 0: first = now; s.settimeout(5)
        last = now; count += 1
except socket.timeout: pass
print(count, last - first)' "$N"
}
# Send N datagrams of 1472 bytes to the guest as fast as possible.
sender() {
	"${IN[@]}" python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(1472)
for i in range(int(sys.argv[2])):
    try: s.sendto(payload, (sys.argv[1], 9))
    except OSError: pass' "$1" "$N"
}

# Starts the guest on VMM $1 with command line $2; output in $3.
start_guest() {
	local vmm=$1 cmdline=$2 out=$3
	if [ "$vmm" = hypercore ]; then
		"${IN[@]}" env HVRUN_HOME="$HOME_DIR" "$HVRUN" run --kernel "$GUEST" --memory 64M --nic bench,mac=52:54:00:33:00:02 \
			--timeout 240 --cmdline "$cmdline" >"$out" 2>&1 &
	else
		"${IN[@]}" timeout 240 qemu-system-x86_64 -M q35 -accel kvm -m 64 -nodefaults -nographic -serial stdio -display none \
			-device isa-debug-exit,iobase=0x501,iosize=1 -kernel "$GUEST" -append "$cmdline" \
			-netdev tap,id=n0,ifname=hcqtap0,script=no,downscript=no,vhost=off \
			-device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:33:00:02 </dev/null >"$out" 2>&1 &
	fi
	echo $!
}
wait_line() { for _ in $(seq 1 2400); do grep -q "^$2" "$1" && return 0; sleep 0.05; done; return 1; }
value() { grep -a "^$2=" "$1" | head -1 | cut -d= -f2 | tr -d '\r'; }

printf "%-10s %-6s %-14s %12s %10s %12s %10s %10s %10s\n" vmm round direction frames frames/s Gbit/s "" rtt_avg_ms rtt_min_ms
for round in $(seq 1 "$ROUNDS"); do
	for vmm in hypercore qemu; do
		out=$(mktemp)
		# guest → host
		receiver > "$out.recv" &
		rpid=$!
		sleep 0.5
		pid=$(start_guest $vmm "ip=10.33.0.2 peer=10.33.0.1 count=1 udp=$N size=1472$extra" "$out")
		wait $rpid || true
		wait "$pid" 2>/dev/null || true
		read -r got secs < "$out.recv"
		python3 -c "import sys; n,t=int(sys.argv[1]),float(sys.argv[2]); fps=(n-1)/t if t>0 else 0; print('%-10s %-6s %-14s %12d %10.0f %12.3f' % (sys.argv[3], sys.argv[4], 'guest->host', n, fps, fps*1514*8/1e9))" "$got" "$secs" $vmm "$round"
		# host → guest, then ping
		: > "$out"
		pid=$(start_guest $vmm "ip=10.33.0.2 peer=10.33.0.1 count=1 sink=$N answer=20$extra" "$out")
		wait_line "$out" sink_ready || { echo "$vmm: the guest did not get ready"; cat "$out"; exit 1; }
		sender 10.33.0.2
		wait_line "$out" "udp_received=" || true
		got=$(value "$out" udp_received); cycles=$(value "$out" udp_rx_cycles)
		ping=$("${IN[@]}" ping -c 20 -i 0.05 -W 2 10.33.0.2 | tail -1)
		wait "$pid" 2>/dev/null || true
		python3 -c "import sys; n,c,mhz=int(sys.argv[1] or 0),int(sys.argv[2] or 0),float(sys.argv[3]); t=c/(mhz*1e6); fps=(n-1)/t if t>0 else 0; print('%-10s %-6s %-14s %12d %10.0f %12.3f' % (sys.argv[4], sys.argv[5], 'host->guest', n, fps, fps*1514*8/1e9))" "$got" "$cycles" "$TSC_MHZ" $vmm "$round"
		echo "$vmm ping: $ping"
		rm -f "$out" "$out.recv"
	done
done
