#!/usr/bin/env bash
# HyperCore against a minimal C VMM (the floor) and QEMU, side by side:
#   (a) one-shot lifecycle: process start -> guest reset -> process exit;
#   (b) a userspace port-I/O exit round trip, as the guest measures it.
# Docs/benchmarks.md explains the numbers. Environment knobs:
#   HVRUN (default: the binary Scripts/install.sh builds, built now with --build-only), RUNS (20), QEMU_RUNS (3),
#   PIO_N (200000 exits per run), PIO_RUNS (3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
make -s -C Tests/Guests OUT="$root/Benchmarks/out/guests" >/dev/null
make -s -C Benchmarks/cfloor OUT="$root/Benchmarks/out"

# Measure exactly what a user installs: Scripts/install.sh's release, fully static build.
if [[ -z "${HVRUN:-}" ]]; then
    HVRUN=$(Scripts/install.sh --build-only)
fi
export HVRUN
export GUESTS=$root/Benchmarks/out/guests FLOOR=$root/Benchmarks/out/floor MEASURE=$root/Benchmarks/out/measure
exec python3 - <<'PY'
import os, re, statistics, subprocess, time

env = os.environ
hvrun, guests, floor, measure = env["HVRUN"], env["GUESTS"], env["FLOOR"], env["MEASURE"]
runs, qemu_runs = int(env.get("RUNS", 20)), int(env.get("QEMU_RUNS", 3))
pio_n, pio_runs = int(env.get("PIO_N", 200000)), int(env.get("PIO_RUNS", 3))
have_hvrun = os.access(hvrun, os.X_OK)
MiB = 1024 * 1024


def qemu(kernel, cmdline=""):
    return ["qemu-system-x86_64", "-M", "q35", "-accel", "kvm", "-m", "128", "-nodefaults",
            "-nographic", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
            "-kernel", kernel, "-append", cmdline]


def spawn(argv, limit_s):
    """Runs argv once; returns (wall seconds, peak RSS bytes, exit status, stdout)."""
    # measure (cfloor/measure.c) forks the program, kills it past the limit,
    # and reports the program's own wall time and peak RSS.
    done = subprocess.run([measure, str(limit_s)] + argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          timeout=limit_s + 10, check=True)
    out = done.stdout.decode(errors="replace")
    m = re.search(r"^measure: wall_us=(\d+) maxrss_kib=(\d+) status=(\d+)$", out, re.M)
    return int(m.group(1)) / 1e6, int(m.group(2)) * 1024, int(m.group(3)), out[:m.start()]


def interleaved(cases, n, limit_s):
    """Runs each (name, argv) n times, round robin, so that drift in the
    host's load hits every VMM alike. Returns {name: [results] or error}."""
    results = {name: [] for name, _ in cases}
    for _ in range(n):
        for name, argv in cases:
            results[name].append(spawn(argv, limit_s))
    for name, rs in results.items():
        bad = [r[2] for r in rs if r[2] != 0]
        if bad:
            results[name] = f"failed: exit status {bad[0]} in {len(bad)} of {n} runs"
    return results


def lifecycle_rows(cases, n, limit_s):
    out = {}
    for name, rs in interleaved(cases, n, limit_s).items():
        if isinstance(rs, str):
            print(f"  {name:<8} {rs}")
            continue
        walls = [r[0] * 1000 for r in rs]
        rss = max(r[1] for r in rs) / MiB
        out[name] = statistics.median(walls), rss
        print(f"  {name:<8} {n:>5} {out[name][0]:>10.1f} {min(walls):>9.1f} {rss:>13.1f}")
    return out


def pio_rows(cases, n, limit_s):
    out = {}
    for name, rs in interleaved(cases, n, limit_s).items():
        found = [re.search(r"^cycles_per_exit=(\d+)$", r[3], re.M) for r in rs] if not isinstance(rs, str) else []
        if isinstance(rs, str) or not all(found):
            print(f"  {name:<8} {rs if isinstance(rs, str) else 'failed: no cycles_per_exit= line'}")
            continue
        per_exit = [int(m.group(1)) for m in found]
        out[name] = statistics.median(per_exit)
        print(f"  {name:<8} {n:>5} {out[name]:>16.0f} {min(per_exit):>10}")
    return out


def ratio_line(label, mine, base, goal):
    if mine is None or base is None:
        print(f"  {label}: n/a")
        return
    r = mine / base
    print(f"  {label}: {r:.2f}x (goal <= {goal}x: {'met' if r <= goal else 'NOT met'})")


print(f"HyperCore benchmarks, {time.strftime('%Y-%m-%d %H:%M')} on {os.uname().release}")
print(f"hvrun: {hvrun}" + ("" if have_hvrun else " (not built)"))
print()

reset = os.path.join(guests, "reset.elf")
print("(a) One-shot lifecycle of reset.elf: process start -> guest reset -> process exit")
print(f"  {'':<8} {'runs':>5} {'median ms':>10} {'min ms':>9} {'peak RSS MiB':>13}")
if not have_hvrun:
    print(f"  {'hvrun':<8} hvrun not built")
cases = [("hvrun", [hvrun, "run", "--kernel", reset])] if have_hvrun else []
life = lifecycle_rows(cases + [("floor", [floor, reset])], runs, 30)
life.update(lifecycle_rows([("QEMU", qemu(reset))], qemu_runs, 60))
hv, fl = life.get("hvrun"), life.get("floor")
ratio_line("hvrun / floor, median wall", hv and hv[0], fl and fl[0], 1.5)
if hv:
    print(f"  hvrun peak RSS: {hv[1]:.1f} MiB (goal <= 8 MiB: {'met' if hv[1] <= 8 else 'NOT met'})")
print()

pio = os.path.join(guests, "piobench.elf")
cmd = f"n={pio_n}"
print(f"(b) Userspace PIO exit round trip: piobench.elf, {pio_n} outb to port 0x523 per run, TSC cycles per exit")
print(f"  {'':<8} {'runs':>5} {'median cycles':>16} {'min':>10}")
if not have_hvrun:
    print(f"  {'hvrun':<8} hvrun not built")
cases = [("hvrun", [hvrun, "run", "--kernel", pio, "--cmdline", cmd])] if have_hvrun else []
exits = pio_rows(cases + [("floor", [floor, pio, cmd]), ("QEMU", qemu(pio, cmd))], pio_runs, 300)
ratio_line("hvrun / floor, cycles per exit", exits.get("hvrun"), exits.get("floor"), 1.11)
PY
