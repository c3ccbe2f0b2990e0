#!/usr/bin/env bash
# Disk benchmarks: hvrun's VHDX code against qemu-img / qemu-io on the same inputs, side by side.
#
#   Benchmarks/disk/run.sh            # builds hvrun in release mode first
#   HVRUN=/path/to/hvrun DISK_TOOL=/path/to/disk-test-tool Benchmarks/disk/run.sh
#
# 1. convert: a 2 GiB dynamic VHDX (16 MiB blocks, every other block written) to raw, with
#    `hvrun disk convert` and `qemu-img convert -f vhdx -O raw`; outputs must be identical.
# 2. random 4 KiB writes into a fresh 8 GiB dynamic VHDX (every write allocates or hits a new
#    block), a flush every 64 writes: throughput and fdatasync/fsync calls per allocated block,
#    `disk-test-tool bench-io` (Tests/DiskTestSupport: the same VHDX library code hvrun uses) vs
#    `qemu-io` running the same script.
# Runs are warm-cache; each is repeated REPEAT times (default 3) and the best time is shown.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-Benchmarks/out}
REPEAT=${REPEAT:-3}
WRITES=${WRITES:-4096}
mkdir -p "$OUT"
if [[ -z "${HVRUN:-}" ]]; then
    swift build -c release --scratch-path .build-bench --product hvrun >/dev/null
    HVRUN=.build-bench/release/hvrun
fi
if [[ -z "${DISK_TOOL:-}" ]]; then
    swift build -c release --scratch-path .build-bench --product disk-test-tool >/dev/null
    DISK_TOOL=.build-bench/release/disk-test-tool
fi
command -v qemu-img >/dev/null || { echo "qemu-img not installed (apt-get install qemu-utils)"; exit 1; }

now() { date +%s.%N; }
best() { sort -n | head -1; }

echo "== convert: 2 GiB dynamic VHDX -> raw (1 GiB allocated in 64 of 128 blocks)"
SRC=$OUT/convert-src.vhdx
rm -f "$SRC"
qemu-img create -q -f vhdx -o block_size=16M "$SRC" 2G
cmds=()
for ((b = 0; b < 128; b += 2)); do cmds+=(-c "write -P $((b % 200 + 1)) $((b * 16))M 16M"); done
qemu-io "${cmds[@]}" "$SRC" >/dev/null
# Two pairs with the same durability: without a final flush (qemu-img's default, cache=unsafe,
# vs hvrun --no-sync) and with one (qemu-img -t writeback vs hvrun's default).
declare -A T
for mode in nosync sync; do
    a=(); b=()
    for ((i = 0; i < REPEAT; i++)); do
        rm -f "$OUT/ours.raw" "$OUT/qemu.raw"
        if [[ $mode == nosync ]]; then
            t0=$(now); "$HVRUN" disk convert --no-sync "$SRC" "$OUT/ours.raw" >/dev/null; t1=$(now)
            qemu-img convert -f vhdx -O raw "$SRC" "$OUT/qemu.raw"; t2=$(now)
        else
            t0=$(now); "$HVRUN" disk convert "$SRC" "$OUT/ours.raw" >/dev/null; t1=$(now)
            qemu-img convert -t writeback -f vhdx -O raw "$SRC" "$OUT/qemu.raw"; t2=$(now)
        fi
        a+=("$(echo "$t1 - $t0" | bc -l)"); b+=("$(echo "$t2 - $t1" | bc -l)")
        cmp -s "$OUT/ours.raw" "$OUT/qemu.raw" || { echo "outputs DIFFER ($mode)"; exit 1; }
    done
    T[ours_$mode]=$(printf '%s\n' "${a[@]}" | best); T[qemu_$mode]=$(printf '%s\n' "${b[@]}" | best)
done
printf '%-34s %10s %10s %8s\n' "best of $REPEAT" "hvrun" "qemu-img" "speed"
printf '%-34s %9.3fs %9.3fs %7.2fx\n' "no final flush (qemu-img default)" "${T[ours_nosync]}" "${T[qemu_nosync]}" "$(echo "${T[qemu_nosync]} / ${T[ours_nosync]}" | bc -l)"
printf '%-34s %9.3fs %9.3fs %7.2fx\n' "flushed (hvrun default, -t writeback)" "${T[ours_sync]}" "${T[qemu_sync]}" "$(echo "${T[qemu_sync]} / ${T[ours_sync]}" | bc -l)"
echo "outputs: identical (cmp after every run)"
rm -f "$OUT/ours.raw" "$OUT/qemu.raw" "$SRC"

echo
echo "== random 4 KiB writes into a fresh dynamic VHDX: $WRITES writes, flush every 64"
SCRIPT=$OUT/random-writes.txt
python3 - "$WRITES" > "$SCRIPT" <<'PY'
import random, sys
random.seed(42)
n = int(sys.argv[1]); size = 8 << 30
for i in range(n):
    print(f"write -P 0x{i % 250 + 1:02x} {random.randrange(size // 4096) * 4096} 4k")
    if (i + 1) % 64 == 0: print("flush")
PY
run_ours() { "$DISK_TOOL" bench-io "$1" "$SCRIPT"; }
run_qemu() { qemu-io "$1" < "$SCRIPT" > /dev/null; }
for who in ours qemu; do
    times=()
    for ((i = 0; i < REPEAT; i++)); do
        img=$OUT/w-$who.vhdx; rm -f "$img"
        qemu-img create -q -f vhdx -o block_size=32M "$img" 8G
        t0=$(now); "run_$who" "$img" > /dev/null; t1=$(now)
        times+=("$(echo "$t1 - $t0" | bc -l)")
    done
    t=$(printf '%s\n' "${times[@]}" | best)
    # fsync-family calls, counted once with strace on a fresh image.
    img=$OUT/w-$who.vhdx; rm -f "$img"; qemu-img create -q -f vhdx -o block_size=32M "$img" 8G
    syncs=$(strace -f -c -e trace=fsync,fdatasync,sync_file_range -o "$OUT/strace-$who.txt" bash -c "$(declare -f "run_$who"); DISK_TOOL=$DISK_TOOL SCRIPT=$SCRIPT run_$who $img" >/dev/null 2>&1;
            awk '$NF ~ /^(fsync|fdatasync|sync_file_range)$/ { s += $4 } END { print s + 0 }' "$OUT/strace-$who.txt")
    blocks=$(python3 - "$img" <<'PY'
import struct, sys
f = open(sys.argv[1], 'rb'); data = f.read(4 << 20)
# count allocated payload blocks via hvrun-independent parsing: region table at 192 KiB
regions = struct.unpack_from('<I', data, 196608 + 8)[0]
bat = [struct.unpack_from('<QI', data, 196608 + 16 + 32 * i + 16) for i in range(regions)
       if data[196608 + 16 + 32 * i:196608 + 32 + 32 * i].hex() == '6677c22d23f600429d64115e9bfd4a08'][0]
f.seek(bat[0]); table = f.read(bat[1])
print(sum(1 for i in range(0, len(table), 8) if struct.unpack_from('<Q', table, i)[0] & 7 == 6))
PY
)
    eval "t_$who=$t syncs_$who=$syncs blocks_$who=$blocks"
done
printf '%-28s %10s %10s\n' "" "hvrun" "qemu-io"
printf '%-28s %9.3fs %9.3fs\n' "time (best of $REPEAT)" "$t_ours" "$t_qemu"
printf '%-28s %10.0f %10.0f\n' "writes/s" "$(echo "$WRITES / $t_ours" | bc -l)" "$(echo "$WRITES / $t_qemu" | bc -l)"
printf '%-28s %10s %10s\n' "allocated blocks" "$blocks_ours" "$blocks_qemu"
printf '%-28s %10s %10s\n' "fsync+fdatasync calls" "$syncs_ours" "$syncs_qemu"
printf '%-28s %10.2f %10.2f\n' "syncs per allocated block" "$(echo "$syncs_ours / $blocks_ours" | bc -l)" "$(echo "$syncs_qemu / $blocks_qemu" | bc -l)"
rm -f "$OUT"/w-*.vhdx
