#!/usr/bin/env python3
"""Live migration of the stateful test guest: hvrun (vm move / vm receive between two store
roots) and QEMU (two qemu-system-x86_64 -accel kvm processes, `migrate tcp:` over loopback),
same guest, same command line, interleaved per repeat.

Cases (stateful.elf, ticks=1: one step= line per 10 ms tick):
  idle512   512 MiB, no dirtying
  dirty512  512 MiB, dirty=256 pages per tick over 256 MiB
  dirty2g   2 GiB, dirty=1024 pages per tick over 1 GiB

Measured per run: total time and downtime as each VMM reports them (hvrun: vm move --json
total_ms/downtime_ms; QEMU: query-migrate total-time/downtime), passes (QEMU: ram
dirty-sync-count), and the longest gap between consecutive step= lines the guest printed around
the migration, as an observer reading the consoles sees it (QEMU: its stdout; hvrun: polling the
source's and then the destination's console.log every 0.5 ms). One JSON line per run on stdout.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "snapshot"))
from snapshot import Qmp, Serial, now_ms  # noqa: E402

CASES = {
    "idle512": (512, "steps=4000 ticks=1"),
    "dirty512": (512, "steps=4000 ticks=1 dirty=256 dirtymb=256"),
    "dirty2g": (2048, "steps=4000 ticks=1 dirty=1024 dirtymb=1024"),
}
STEP = re.compile(rb"^step=(\d+)\r?$")
WARMUP_STEP = 200      # migrate once the guest has run 2 s
AFTER_STEPS = 50       # and watch it run 0.5 s on the destination


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def longest_gap(steps):
    """steps: {k: first time seen}. The longest time between consecutive steps (ms) and where."""
    ks = sorted(steps)
    best, where = 0.0, None
    for a, b in zip(ks, ks[1:]):
        if b == a + 1 and steps[b] - steps[a] > best:
            best, where = steps[b] - steps[a], b
    missing = [k for k in range(ks[0], ks[-1] + 1) if k not in steps] if ks else []
    return best, where, missing


def baseline_tick(steps):
    """The median time between consecutive steps over the 100 before the migration (ms): what one
    tick costs this guest on this host, migration or not. The longest gap minus this is what the
    migration added."""
    gaps = sorted(steps[k] - steps[k - 1] for k in range(WARMUP_STEP - 99, WARMUP_STEP + 1)
                  if k in steps and k - 1 in steps)
    return gaps[len(gaps) // 2] if gaps else 0.0


class FileTail:
    """Polls console.log files (source, then destination) and timestamps each step= line."""

    def __init__(self):
        self.steps = {}
        self.paths = []
        self.stop = False
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, path):
        self.paths.append(path)

    def _run(self):
        handles = {}
        partial = {}
        while not self.stop:
            for path in list(self.paths):
                if path not in handles:
                    try:
                        handles[path] = open(path, "rb")
                        partial[path] = b""
                    except FileNotFoundError:
                        continue
                data = handles[path].read()
                if not data:
                    continue
                t = now_ms()
                text = partial[path] + data
                lines = text.split(b"\n")
                partial[path] = lines.pop()
                for line in lines:
                    m = STEP.match(line)
                    if m:
                        self.steps.setdefault(int(m.group(1)), t)
                    elif line.startswith(b"error="):
                        self.errors.append(line.decode(errors="replace"))
            time.sleep(0.0005)

    def wait_step(self, k, deadline_s):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.steps and max(self.steps) >= k:
                return
            if self.errors:
                raise RuntimeError("guest: %s" % self.errors)
            time.sleep(0.002)
        raise RuntimeError("no step=%d within %.0f s" % (k, deadline_s))


def run_hvrun(hvrun, guest, memory, cmdline, workdir, max_downtime, dirty_log):
    homes = [os.path.join(workdir, "src"), os.path.join(workdir, "dst")]
    env = [dict(os.environ, HVRUN_HOME=h) for h in homes]
    subprocess.run([hvrun, "vm", "create", "g", "--kernel", guest, "--memory", "%dM" % memory, "--cmdline", cmdline],
                   env=env[0], check=True, stdout=subprocess.DEVNULL)
    tail = FileTail()
    tail.add(os.path.join(homes[0], "vms", "g", "console.log"))
    subprocess.run([hvrun, "vm", "start", "g"], env=env[0], check=True, stdout=subprocess.DEVNULL)
    receiver = None
    try:
        tail.wait_step(WARMUP_STEP, 60)
        receiver = subprocess.Popen([hvrun, "vm", "receive", "--listen", "127.0.0.1:0"], env=env[1],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        address = receiver.stdout.readline().decode().split()[-1]
        token = receiver.stdout.readline().decode().split()[-1]
        tail.add(os.path.join(homes[1], "vms", "g", "console.log"))
        moved = subprocess.run([hvrun, "vm", "move", "g", "--to", address, "--token", token, "--json",
                                "--max-downtime", str(max_downtime), "--dirty-log", dirty_log],
                               env=env[0], capture_output=True, timeout=300)
        if moved.returncode != 0:
            raise RuntimeError("vm move: %s %s" % (moved.stdout, moved.stderr))
        receiver.wait(60)
        report = json.loads(moved.stdout)
        last = max(tail.steps)
        tail.wait_step(last + AFTER_STEPS, 60)
        gap, where, missing = longest_gap(tail.steps)
        tick = baseline_tick(tail.steps)
        return {"baseline_tick_ms": round(tick, 2), "gap_excess_ms": round(gap - tick, 2),"total_ms": report["total_ms"], "downtime_ms": report["downtime_ms"], "passes": report["passes"],
                "dirty_log": report.get("dirty_log"), "dirty_log_ms": report.get("dirty_log_ms"),
                "bytes_sent": report["bytes_sent"], "max_throttle_percent": report["max_throttle_percent"],
                "guest_gap_ms": round(gap, 2), "gap_at_step": where, "missing_steps": len(missing),
                "phases_ms": report.get("phases_ms"), "switchover_ms": report.get("switchover_ms"),
                "destination_ms": report.get("destination_ms")}
    finally:
        tail.stop = True
        for e in env:
            subprocess.run([hvrun, "vm", "stop", "g", "--force"], env=e, capture_output=True)
        if receiver and receiver.poll() is None:
            receiver.kill()


def run_qemu(guest, memory, cmdline, workdir, uncapped=True):
    def spawn(tag, extra):
        qmp_path = os.path.join(workdir, tag + ".qmp")
        args = ["qemu-system-x86_64", "-M", "q35", "-accel", "kvm", "-m", str(memory), "-nodefaults",
                "-nographic", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-qmp", "unix:%s,server=on,wait=off" % qmp_path,
                "-kernel", guest, "-append", cmdline] + extra
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=open(os.path.join(workdir, tag + ".err"), "ab"))
        return proc, Serial(proc, os.path.join(workdir, tag + ".serial")), Qmp(qmp_path)

    steps = {}

    def collect(serial):
        while True:
            t, line = serial.lines.get()
            if line is None:
                return
            m = STEP.match(line)
            if m:
                steps.setdefault(int(m.group(1)), t)

    port = free_port()
    src, src_serial, src_qmp = spawn("src", [])
    dst, dst_serial, dst_qmp = spawn("dst", ["-incoming", "tcp:127.0.0.1:%d" % port])
    try:
        threading.Thread(target=collect, args=(src_serial,), daemon=True).start()
        threading.Thread(target=collect, args=(dst_serial,), daemon=True).start()
        end = time.monotonic() + 60
        while not steps or max(steps) < WARMUP_STEP:
            if time.monotonic() > end:
                raise RuntimeError("qemu: no step=%d" % WARMUP_STEP)
            time.sleep(0.002)
        # QEMU 7.2 caps migration at 32 MiB/s unless told otherwise; loopback can do far more.
        # `qemu` lifts the cap (the stronger peer); `qemu-default` keeps it, as a user who just
        # types `migrate` gets.
        if uncapped:
            src_qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        src_qmp.execute("migrate", uri="tcp:127.0.0.1:%d" % port)
        while True:
            info = src_qmp.execute("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled"):
                raise RuntimeError("qemu migration %s" % info)
            time.sleep(0.001)
        last = max(steps)
        end = time.monotonic() + 60
        while max(steps) < last + AFTER_STEPS:
            if time.monotonic() > end:
                raise RuntimeError("qemu: the guest did not continue on the destination")
            time.sleep(0.002)
        gap, where, missing = longest_gap(steps)
        tick = baseline_tick(steps)
        return {"baseline_tick_ms": round(tick, 2), "gap_excess_ms": round(gap - tick, 2),
                "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                "passes": info.get("ram", {}).get("dirty-sync-count"),
                "bytes_sent": info.get("ram", {}).get("transferred"),
                "guest_gap_ms": round(gap, 2), "gap_at_step": where, "missing_steps": len(missing)}
    finally:
        for proc, qmp in ((src, src_qmp), (dst, dst_qmp)):
            try:
                qmp.execute("quit")
            except (RuntimeError, OSError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guest", required=True)
    parser.add_argument("--hvrun")
    parser.add_argument("--vmm", default="both", choices=["hvrun", "qemu", "both"])
    parser.add_argument("--qemu-default", action="store_true",
                        help="also run QEMU with its default 32 MiB/s cap (labelled qemu-default)")
    parser.add_argument("--cases", default="idle512,dirty512,dirty2g")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-downtime", type=float, default=10, help="hvrun vm move --max-downtime (ms)")
    parser.add_argument("--dirty-logs", default="manual",
                        help="hvrun vm move --dirty-log values to run, comma-separated (classic runs are labelled hvrun-classic)")
    args = parser.parse_args()
    hvruns = [("hvrun" if mode == "manual" else "hvrun-" + mode, mode) for mode in args.dirty_logs.split(",")]
    qemus = [("qemu", None)] + ([("qemu-default", None)] if args.qemu_default else [])
    vmms = (hvruns if args.vmm != "qemu" else []) + (qemus if args.vmm != "hvrun" else [])
    for repeat in range(args.repeat):
        for case in args.cases.split(","):
            memory, cmdline = CASES[case]
            for vmm, dirty_log in vmms:
                workdir = tempfile.mkdtemp(prefix="hvmig-")
                try:
                    if dirty_log:
                        result = run_hvrun(args.hvrun, args.guest, memory, cmdline, workdir, args.max_downtime, dirty_log)
                    else:
                        result = run_qemu(args.guest, memory, cmdline, workdir, uncapped=vmm == "qemu")
                    result.update({"vmm": vmm, "case": case, "memory_mib": memory, "repeat": repeat})
                except Exception as error:  # one failed run is reported, the others go on
                    result = {"vmm": vmm, "case": case, "repeat": repeat, "error": str(error)}
                print(json.dumps(result), flush=True)
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
