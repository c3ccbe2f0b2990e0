#!/usr/bin/env python3
"""Save/restore timing of a running guest (Tests/Guests/stateful.elf).

For each memory size and amount of touched RAM it boots the stateful guest,
waits for its `step=N` line, then times

  save:    pause + write the whole VM to a file, until the VMM says it is done
           (QEMU: QMP `stop`, `migrate "exec:cat > FILE"`, poll `query-migrate`
           until `completed`; hvrun: `save` on its control socket, until the
           reply, sent once the snapshot directory is fsync'd);
  restore: from starting a NEW VMM process on that file until the guest's next
           `step=` line appears on its serial output (QEMU: `-incoming
           "exec:cat FILE"` and `-S`, QMP `cont` once the state is loaded;
           hvrun: `hvrun run --restore DIR --boot-time`).

and prints one JSON line per measurement:
  {"vmm":"qemu","memory_mib":512,"touched_mib":32,"save_ms":…,"file_bytes":…,"restore_ms":…, …}
file_bytes is the snapshot's allocated size (st_blocks * 512 summed, as `du`),
apparent_bytes its size (st_size summed; hvrun's `memory` file is sparse).
Extra keys: "loaded_ms" (QEMU: process start until the VMM reported the state
loaded and accepted `cont`; hvrun: its own `--boot-time` total, process start
until the vCPUs were released), "saved_step" / "restored_step" (the guest's
last step line before the save and first after the restore: restored_step must
be saved_step + 1, or the measurement fails); hvrun only: "hvrun_pause_ms" and
"hvrun_save_ms" (pause and pause + write + fsync, from its reply),
"memory_bytes_written", "state_bytes", and the restore phases "restore_main_ms",
"restore_rebuilt_ms", "restore_released_ms" from its `--boot-time` line.

`--vmm qemu,hvrun` runs both interleaved (per repeat), `--table` prints the
side-by-side medians and the goals on stderr at the end.

Timings are wall clock (time.monotonic) taken here. Standard library only.
"""
import argparse
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

STEP = re.compile(rb"^step=(\d+)\r?$")


def now_ms():
    return time.monotonic() * 1000.0


class Serial:
    """Reads a VMM's stdout (the guest's COM1) line by line in a thread."""

    def __init__(self, proc, log_path):
        self.lines = queue.Queue()
        self.log = open(log_path, "ab")
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for line in iter(pipe.readline, b""):
            t = now_ms()
            self.log.write(line)
            self.log.flush()
            self.lines.put((t, line.rstrip(b"\n")))
        self.lines.put((now_ms(), None))

    def wait_step(self, deadline_s, at_least=1):
        """Returns (time_ms, k) of the first `step=k` line with k >= at_least."""
        end = time.monotonic() + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError("no step line within %.0f s" % deadline_s)
            try:
                t, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("the VMM's output ended")
            if line.startswith(b"error="):
                raise RuntimeError("guest: " + line.decode(errors="replace"))
            m = STEP.match(line)
            if m and int(m.group(1)) >= at_least:
                return t, int(m.group(1))

    def last_step(self):
        """The last step line already read (draining the queue), or None."""
        k = None
        while True:
            try:
                _, line = self.lines.get_nowait()
            except queue.Empty:
                return k
            if line is None:
                return k
            m = STEP.match(line)
            if m:
                k = int(m.group(1))


class Qmp:
    """A minimal QMP client: JSON objects, one per line, over a Unix socket."""

    def __init__(self, path, deadline_s=30):
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.002)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def execute(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError("%s: %s" % (command, reply["error"]))
            return reply.get("return")

    def close(self):
        self.sock.close()


class QemuVmm:
    name = "qemu"

    def __init__(self, guest, workdir, binary="qemu-system-x86_64", unlimited_bandwidth=True):
        self.guest, self.workdir, self.binary = guest, workdir, binary
        self.unlimited_bandwidth = unlimited_bandwidth

    def _args(self, memory_mib, cmdline, qmp_path):
        return [self.binary, "-M", "q35", "-accel", "kvm", "-m", str(memory_mib), "-nodefaults",
                "-nographic", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                "-qmp", "unix:%s,server=on,wait=off" % qmp_path,
                "-kernel", self.guest, "-append", cmdline]

    def _spawn(self, args, tag):
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=open(os.path.join(self.workdir, tag + ".err"), "ab"))
        return proc, Serial(proc, os.path.join(self.workdir, tag + ".serial"))

    def boot(self, memory_mib, cmdline):
        self.cmdline, self.memory_mib = cmdline, memory_mib
        qmp_path = os.path.join(self.workdir, "src.qmp")
        self.proc, self.serial = self._spawn(self._args(memory_mib, cmdline, qmp_path), "src")
        self.qmp = Qmp(qmp_path)
        if self.unlimited_bandwidth:
            # QEMU 7.2 limits migration to 32 MiB/s by default; a save to a file
            # (libvirt's `virsh save` too) lifts that.
            self.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        return self.serial

    def save(self, path):
        """Pauses the guest and writes it to `path`. Returns the guest's last step before the pause."""
        self.qmp.execute("stop")
        self.qmp.execute("migrate", uri="exec:cat > %s" % path)
        while True:
            status = self.qmp.execute("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeError("migration " + status)
            time.sleep(0.0005)

    def stop(self, proc=None, qmp=None):
        proc, qmp = proc or self.proc, qmp or self.qmp
        try:
            qmp.execute("quit")
        except (RuntimeError, OSError):
            pass
        qmp.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restore(self, path):
        """Starts a new QEMU on `path` and resumes it. Returns (serial, loaded_ms since spawn)."""
        qmp_path = os.path.join(self.workdir, "dst.qmp")
        args = self._args(self.memory_mib, self.cmdline, qmp_path) + ["-S", "-incoming", "exec:cat %s" % path]
        t0 = now_ms()
        self.dst, serial = self._spawn(args, "dst")
        self.dst_qmp = Qmp(qmp_path)
        # The saved guest was paused, so QEMU leaves it paused once loaded; `cont`
        # sent while still "inmigrate" would be forgotten.
        while self.dst_qmp.execute("query-status")["status"] == "inmigrate":
            time.sleep(0.0005)
        self.dst_qmp.execute("cont")
        return serial, t0, now_ms() - t0

    def stop_restored(self):
        self.stop(self.dst, self.dst_qmp)


class HvrunVmm:
    """HyperCore's side: `hvrun run --control SOCKET`, then `hvrun run --restore DIR`.

    The control socket speaks QMP-shaped JSON lines:
      greeting  {"hvrun": {"version": …, "state": "running"}}
      request   {"execute": "save", "arguments": {"path": DIR}, "id": 1}
      reply     {"return": {"path", "memory_bytes_written", "state_bytes", "pause_ms", "total_ms"}, "id": 1}
    The reply comes once the snapshot directory (`state` and the sparse `memory`)
    is fsync'd; hvrun then exits 0 by itself. Restore is a new process,
    `hvrun run --restore DIR --boot-time`, timed here from its spawn until the
    guest's next `step=` line; hvrun's own stderr line `hvrun: restore time: …`
    is parsed into the restore_*_ms keys.
    """
    name = "hvrun"

    RESTORE_LINE = re.compile(r"restore time: process start \u2192 main ([\d.]+) ms, snapshot read and machine "
                              r"rebuilt \+([\d.]+) ms, state loaded and vCPUs released \+([\d.]+) ms; total ([\d.]+) ms")

    def __init__(self, guest, workdir, binary):
        self.guest, self.workdir, self.binary = guest, workdir, binary
        self.extra = {}

    def _spawn(self, args, tag):
        err = os.path.join(self.workdir, tag + ".err")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(err, "wb"))
        return proc, Serial(proc, os.path.join(self.workdir, tag + ".serial"))

    def boot(self, memory_mib, cmdline):
        self.extra = {}
        sock_path = os.path.join(self.workdir, "src.sock")
        if os.path.exists(sock_path):
            os.remove(sock_path)
        self.proc, self.serial = self._spawn([self.binary, "run", "--kernel", self.guest, "--cmdline", cmdline,
                                              "--memory", "%dM" % memory_mib, "--control", sock_path], "src")
        end = time.monotonic() + 30
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("no hvrun control socket (see src.err in the work directory)")
                time.sleep(0.002)
        self.file = self.sock.makefile("rwb", buffering=0)
        greeting = self._read()
        if "hvrun" not in greeting:
            raise RuntimeError("unexpected greeting %r" % greeting)
        self.extra["hvrun_version"] = greeting["hvrun"].get("version")
        return self.serial

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("hvrun closed the control connection")
        return json.loads(line)

    def execute(self, command, request_id, **arguments):
        msg = {"execute": command, "id": request_id}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if reply.get("id") != request_id:
                continue
            if "error" in reply:
                raise RuntimeError("%s: %s" % (command, reply["error"]))
            return reply.get("return")

    def save(self, path):
        """Pauses the running guest and writes it to the directory `path`; returns when hvrun replies."""
        reply = self.execute("save", 1, path=path)
        self.extra.update({"hvrun_pause_ms": reply.get("pause_ms"), "hvrun_save_ms": reply.get("total_ms"),
                           "memory_bytes_written": reply.get("memory_bytes_written"),
                           "state_bytes": reply.get("state_bytes")})

    def stop(self):
        """After `save` hvrun exits 0 by itself; after a failed save it is told to stop."""
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                self.execute("stop", 2)
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        if self.proc.returncode != 0:
            raise RuntimeError("hvrun exited with status %d after save" % self.proc.returncode)

    def restore(self, path):
        """Starts `hvrun run --restore path --boot-time`. Returns (serial, spawn time, None)."""
        t0 = now_ms()
        self.dst, serial = self._spawn([self.binary, "run", "--restore", path, "--boot-time"], "dst")
        return serial, t0, None

    def stop_restored(self):
        """SIGTERM (hvrun stops the machine and exits); returns hvrun's own restore total, ms."""
        self.dst.terminate()
        try:
            self.dst.wait(10)
        except subprocess.TimeoutExpired:
            self.dst.kill()
            self.dst.wait()
        with open(os.path.join(self.workdir, "dst.err"), encoding="utf-8", errors="replace") as f:
            m = self.RESTORE_LINE.search(f.read())
        if not m:
            return None
        main_ms, rebuilt_ms, released_ms, total_ms = (float(x) for x in m.groups())
        self.extra.update({"restore_main_ms": main_ms, "restore_rebuilt_ms": rebuilt_ms,
                           "restore_released_ms": released_ms})
        return total_ms


def snapshot_bytes(path):
    """(apparent, allocated) bytes of a file or of all files under a directory; allocated = st_blocks * 512, as du."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    apparent = allocated = 0
    for f in files:
        st = os.lstat(f)
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


def measure(vmm, memory_mib, touched_mib, save_after_step, workdir):
    # ticks=1: a step every ~10 ms, so the wait for the next step adds at most that to restore_ms.
    cmdline = "steps=4096 ticks=1 touch=%d" % touched_mib if touched_mib else "steps=4096 ticks=1"
    snap = os.path.join(workdir, "%s-%d-%d.snap" % (vmm.name, memory_mib, touched_mib))
    serial = vmm.boot(memory_mib, cmdline)
    try:
        serial.wait_step(60, save_after_step)
        t0 = now_ms()
        vmm.save(snap)
        save_ms = now_ms() - t0
    finally:
        vmm.stop()
    serial.thread.join(10)  # the VMM has exited: every line it printed has been read
    saved_step = serial.last_step()
    if saved_step is None:  # no step line after the one waited for
        saved_step = save_after_step
    apparent, allocated = snapshot_bytes(snap)
    serial2, t0, loaded_ms = vmm.restore(snap)
    try:
        t1, restored_step = serial2.wait_step(60)
    finally:
        reported = vmm.stop_restored()
    if loaded_ms is None:
        loaded_ms = reported
    if restored_step != saved_step + 1:
        raise RuntimeError("restored guest printed step=%d after step=%d" % (restored_step, saved_step))
    if os.path.isdir(snap):
        shutil.rmtree(snap)
    else:
        os.remove(snap)
    result = {"vmm": vmm.name, "memory_mib": memory_mib, "touched_mib": touched_mib,
              "save_ms": round(save_ms, 1), "file_bytes": allocated, "apparent_bytes": apparent,
              "restore_ms": round(t1 - t0, 1),
              "loaded_ms": None if loaded_ms is None else round(loaded_ms, 1),
              "saved_step": saved_step, "restored_step": restored_step}
    result.update(getattr(vmm, "extra", {}))
    return result


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summary(results, out):
    """The side-by-side table (medians) and the goals, as Markdown."""
    MiB = 1 << 20
    keys = sorted({(r["memory_mib"], r["touched_mib"]) for r in results})
    med = {}
    for r in results:
        med.setdefault((r["vmm"], r["memory_mib"], r["touched_mib"]), []).append(r)
    def m(vmm, mem, touched, key):
        rs = med.get((vmm, mem, touched))
        return median([r.get(key) for r in rs]) if rs else None
    def fmt(x, digits=1):
        return "–" if x is None else ("%.*f" % (digits, x))
    def ratio(a, b):
        return "–" if a is None or b is None or b == 0 else "%.1f×" % (a / b)
    print("| memory | touched | QEMU save ms | hvrun save ms (own total) | save QEMU/hvrun "
          "| QEMU restore ms | hvrun restore ms (own total) | restore QEMU/hvrun "
          "| QEMU file MiB | hvrun alloc MiB (apparent) |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|", file=out)
    for mem, touched in keys:
        qs, hs = m("qemu", mem, touched, "save_ms"), m("hvrun", mem, touched, "save_ms")
        qr, hr = m("qemu", mem, touched, "restore_ms"), m("hvrun", mem, touched, "restore_ms")
        qf, hf = m("qemu", mem, touched, "file_bytes"), m("hvrun", mem, touched, "file_bytes")
        ha = m("hvrun", mem, touched, "apparent_bytes")
        print("| %d MiB | %d MiB | %s | %s (%s) | %s | %s | %s (%s) | %s | %s | %s (%s) |" % (
            mem, touched, fmt(qs), fmt(hs), fmt(m("hvrun", mem, touched, "hvrun_save_ms")), ratio(qs, hs),
            fmt(qr), fmt(hr), fmt(m("hvrun", mem, touched, "loaded_ms")), ratio(qr, hr),
            fmt(qf and qf / MiB), fmt(hf and hf / MiB), fmt(ha and ha / MiB, 0)), file=out)
    print(file=out)
    # Goals, over every combination both VMMs ran (the worst case decides).
    save_r = [m("qemu", k[0], k[1], "save_ms") / m("hvrun", k[0], k[1], "save_ms")
              for k in keys if m("qemu", *k, "save_ms") and m("hvrun", *k, "save_ms")]
    rest_r = [m("qemu", k[0], k[1], "restore_ms") / m("hvrun", k[0], k[1], "restore_ms")
              for k in keys if m("qemu", *k, "restore_ms") and m("hvrun", *k, "restore_ms")]
    if save_r:
        print("goal save >= 5x faster: worst %.1fx -> %s" % (min(save_r), "met" if min(save_r) >= 5 else "MISSED"), file=out)
    if rest_r:
        print("goal restore >= 8x faster: worst %.1fx -> %s" % (min(rest_r), "met" if min(rest_r) >= 8 else "MISSED"), file=out)
    over = [(k, m("hvrun", *k, "file_bytes") - k[1] * MiB) for k in keys if m("hvrun", *k, "file_bytes") is not None]
    if over:
        worst = max(over, key=lambda x: x[1])
        print("goal hvrun allocated <= touched + 1 MiB: worst %d MiB/%d MiB touched: touched %+.2f MiB -> %s" % (
            worst[0][0], worst[0][1], worst[1] / MiB, "met" if worst[1] <= MiB else "MISSED"), file=out)
    for touched in sorted({k[1] for k in keys}):
        rs = [(mem, m("hvrun", mem, touched, "restore_ms")) for mem, t in keys if t == touched and m("hvrun", mem, touched, "restore_ms")]
        if len(rs) > 1:
            print("hvrun restore by memory, %d MiB touched: %s" % (
                touched, ", ".join("%d MiB %.1f ms" % x for x in rs)), file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", required=True, help="stateful.elf")
    ap.add_argument("--vmm", default="qemu", help="qemu, hvrun or both (qemu,hvrun: run interleaved)")
    ap.add_argument("--hvrun", default="hvrun", help="the hvrun binary (--vmm hvrun)")
    ap.add_argument("--memory", default="512,2048", help="MiB, comma-separated")
    ap.add_argument("--qemu-memory", help="the sizes of --memory QEMU runs too (default: all)")
    ap.add_argument("--touch", default="32", help="MiB the guest writes at start, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--after-step", type=int, default=5, help="save once the guest printed step=N")
    ap.add_argument("--default-bandwidth", action="store_true",
                    help="QEMU: keep the 32 MiB/s migration limit instead of lifting it")
    ap.add_argument("--workdir", help="snapshots and logs (default: a temporary directory, removed)")
    ap.add_argument("--table", action="store_true", help="print the side-by-side table of medians on stderr at the end")
    a = ap.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="snapshot-bench-")
    os.makedirs(workdir, exist_ok=True)
    names = [x for x in a.vmm.split(",") if x]
    for n in names:
        if n not in ("qemu", "hvrun"):
            ap.error("--vmm: qemu, hvrun or qemu,hvrun")
    memories = [int(x) for x in a.memory.split(",")]
    qemu_memories = set(int(x) for x in a.qemu_memory.split(",")) if a.qemu_memory else set(memories)
    results = []
    try:
        vmms = {"qemu": QemuVmm(a.guest, workdir, unlimited_bandwidth=not a.default_bandwidth),
                "hvrun": HvrunVmm(a.guest, workdir, a.hvrun)}
        for mem in memories:
            for touched in [int(x) for x in a.touch.split(",")]:
                for _ in range(a.repeat):
                    # Interleaved, so load drift on a shared machine hits both alike.
                    for n in names:
                        if n == "qemu" and mem not in qemu_memories:
                            continue
                        r = measure(vmms[n], mem, touched, a.after_step, workdir)
                        results.append(r)
                        print(json.dumps(r, separators=(",", ":")), flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if a.table and results:
            print(file=sys.stderr)
            summary(results, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
