#!/usr/bin/env python3
"""Save/restore timing of a running guest (Tests/Guests/stateful.elf).

For each memory size and amount of touched RAM it boots the stateful guest,
waits for its `step=N` line, then times

  save:    pause + write the whole VM to a file, until the VMM says it is done
           (QEMU: QMP `stop`, `migrate "exec:cat > FILE"`, poll `query-migrate`
           until `completed`);
  restore: from starting a NEW VMM process on that file until the guest's next
           `step=` line appears on its serial output (QEMU: `-incoming
           "exec:cat FILE"` and `-S`, QMP `cont` once the state is loaded).

and prints one JSON line per measurement:
  {"vmm":"qemu","memory_mib":512,"touched_mib":32,"save_ms":…,"file_bytes":…,"restore_ms":…, …}
Extra keys: "loaded_ms" (process start until the VMM reported the state loaded
and accepted `cont`), "saved_step" / "restored_step" (the guest's last step
line before the save and first after the restore: restored_step must be
saved_step + 1, or the measurement fails).

Timings are wall clock (time.monotonic) taken here. Standard library only.
The HyperCore side is the HvrunVmm class below (not implemented yet).
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
    """HyperCore's side: to be filled in once hvrun has `--control` and `--restore`.

    Expected protocol (QMP-shaped JSON lines on `hvrun run --control SOCKET`):
      greeting  {"hvrun": {...}}
      request   {"execute": "save", "arguments": {"path": DIR}, "id": 1}
      reply     {"return": {...}, "id": 1}   (after the snapshot is complete on disk)
    and restore = `hvrun run --restore DIR` (a new process), timed until the next
    `step=` line. file_bytes is then the total size of the files under DIR.
    Implement boot/save/stop/restore/stop_restored with the signatures of QemuVmm.
    """
    name = "hypercore"

    def __init__(self, guest, workdir, binary):
        self.guest, self.workdir, self.binary = guest, workdir, binary

    def boot(self, memory_mib, cmdline):
        # e.g. [binary, "run", "--kernel", guest, "--cmdline", cmdline, "--memory", f"{memory_mib}M",
        #       "--control", socket_path], then connect, read the {"hvrun": …} greeting.
        raise NotImplementedError("hvrun --control is not there yet")


def file_bytes(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


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
    size = file_bytes(snap)
    serial2, t0, loaded_ms = vmm.restore(snap)
    try:
        t1, restored_step = serial2.wait_step(60)
    finally:
        vmm.stop_restored()
    if restored_step != saved_step + 1:
        raise RuntimeError("restored guest printed step=%d after step=%d" % (restored_step, saved_step))
    if os.path.isdir(snap):
        shutil.rmtree(snap)
    else:
        os.remove(snap)
    return {"vmm": vmm.name, "memory_mib": memory_mib, "touched_mib": touched_mib,
            "save_ms": round(save_ms, 1), "file_bytes": size, "restore_ms": round(t1 - t0, 1),
            "loaded_ms": round(loaded_ms, 1), "saved_step": saved_step, "restored_step": restored_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", required=True, help="stateful.elf")
    ap.add_argument("--vmm", choices=["qemu", "hvrun"], default="qemu")
    ap.add_argument("--hvrun", default="hvrun", help="the hvrun binary (--vmm hvrun)")
    ap.add_argument("--memory", default="512,2048", help="MiB, comma-separated")
    ap.add_argument("--touch", default="32", help="MiB the guest writes at start, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--after-step", type=int, default=5, help="save once the guest printed step=N")
    ap.add_argument("--default-bandwidth", action="store_true",
                    help="QEMU: keep the 32 MiB/s migration limit instead of lifting it")
    ap.add_argument("--workdir", help="snapshots and logs (default: a temporary directory, removed)")
    a = ap.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="snapshot-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        if a.vmm == "qemu":
            vmm = QemuVmm(a.guest, workdir, unlimited_bandwidth=not a.default_bandwidth)
        else:
            vmm = HvrunVmm(a.guest, workdir, a.hvrun)
        for mem in [int(x) for x in a.memory.split(",")]:
            for touched in [int(x) for x in a.touch.split(",")]:
                for _ in range(a.repeat):
                    print(json.dumps(measure(vmm, mem, touched, a.after_step, workdir), separators=(",", ":")), flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
