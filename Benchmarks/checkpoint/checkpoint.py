#!/usr/bin/env python3
"""Checkpoints, merges and export/import of stored VMs, with their peers in the same run.

Measured (each REPEAT times, medians reported):
  - checkpoint of a running guest (stateful.elf touching 32 MiB, a 1 GiB VHDX disk it writes):
    the guest-visible pause hvrun reports and the command's total time, at each --memory;
  - apply of that checkpoint to the running VM (turns it off, new empty children, saved state);
  - delete of a checkpoint whose differencing disk holds --merge-mib MiB: the store's merge
    (hvrun vm checkpoint delete on the off VM) vs `qemu-img commit` of the same amount of data in a
    qcow2 overlay (QEMU cannot open VHDX chains, so its own format is the peer);
  - export of a saved VM and import (--mode restore) vs `cp -r --sparse=always` of the bundle (the
    floor: what copying the files costs).
stdout: one JSON object per measurement; --table: a Markdown summary on stderr.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time


def run(cmd, env=None, check=True, timeout=600):
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = (time.monotonic() - started) * 1000
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result, elapsed


def steps(log_path):
    try:
        with open(log_path) as log:
            return [int(line[5:]) for line in log if line.startswith("step=")]
    except FileNotFoundError:
        return []


def wait_steps(log_path, count, timeout=60):
    deadline = time.monotonic() + timeout
    while len(steps(log_path)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest printed fewer than {count} steps in {timeout} s ({log_path})")
        time.sleep(0.05)


def emit(record):
    print(json.dumps(record), flush=True)
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hvrun", required=True)
    parser.add_argument("--disk-tool", required=True, help="disk-test-tool (writes data into a VHDX chain)")
    parser.add_argument("--guest", required=True)
    parser.add_argument("--memory", default="512,2048")
    parser.add_argument("--merge-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="hvrun-checkpoint-bench-")
    os.makedirs(work, exist_ok=True)
    records = []
    hv = args.hvrun

    def store(name):
        env = dict(os.environ, HVRUN_HOME=os.path.join(work, name))
        shutil.rmtree(env["HVRUN_HOME"], ignore_errors=True)
        return env

    try:
        for memory in [int(m) for m in args.memory.split(",")]:
            for repeat in range(args.repeat):
                env = store(f"cp-{memory}-{repeat}")
                bundle = os.path.join(env["HVRUN_HOME"], "vms", "g")
                run([hv, "vm", "create", "g", "--kernel", args.guest, "--memory", f"{memory}M", "--new-disk", "1G",
                     "--cmdline", "steps=4000 ticks=2 cpus=1 blk=1 touch=32"], env)
                run([hv, "vm", "start", "g"], env)
                wait_steps(bundle + "/console.log", 20)
                result, total = run([hv, "vm", "checkpoint", "create", "g", "one", "--json"], env)
                pause = json.loads(result.stdout)["pause_ms"]
                records.append(emit({"op": "checkpoint", "memory_mib": memory, "pause_ms": pause, "total_ms": round(total, 1)}))
                wait_steps(bundle + "/console.log", 40)
                _, applied = run([hv, "vm", "checkpoint", "apply", "g", "one", "--yes"], env)
                records.append(emit({"op": "apply", "memory_mib": memory, "total_ms": round(applied, 1)}))
                run([hv, "vm", "delete", "g"], env)

        data = args.merge_mib << 20
        script = os.path.join(work, "fill.io")
        with open(script, "w") as out:
            for offset in range(0, data, 1 << 20):
                out.write(f"write -P 0x{(offset >> 20) % 251 + 1:02x} {offset} 1024k\n")
        for repeat in range(args.repeat):
            env = store(f"merge-{repeat}")
            bundle = os.path.join(env["HVRUN_HOME"], "vms", "d")
            run([hv, "vm", "create", "d", "--kernel", args.guest, "--new-disk", f"{max(2, args.merge_mib // 1024 + 1)}G"], env)
            run([hv, "vm", "checkpoint", "create", "d", "one"], env)
            info = json.loads(run([hv, "vm", "info", "d", "--json"], env)[0].stdout)
            run([args.disk_tool, "bench-io", info["disks"][0]["active_path"], script])
            subprocess.run(["sync"])
            _, merged = run([hv, "vm", "checkpoint", "delete", "d", "one"], env)
            records.append(emit({"op": "delete-merge", "vmm": "hvrun", "mib": args.merge_mib, "total_ms": round(merged, 1),
                                 "ms_per_gib": round(merged * 1024 / args.merge_mib, 1)}))
            if shutil.which("qemu-img") and shutil.which("qemu-io"):
                base, overlay = os.path.join(work, "base.qcow2"), os.path.join(work, "overlay.qcow2")
                for path in (base, overlay):
                    if os.path.exists(path):
                        os.unlink(path)
                run(["qemu-img", "create", "-q", "-f", "qcow2", base, f"{max(2, args.merge_mib // 1024 + 1)}G"])
                run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
                with open(script) as lines:
                    commands = [arg for line in lines for arg in ("-c", line.strip())]
                for start in range(0, len(commands), 512):
                    run(["qemu-io", "-f", "qcow2", overlay] + commands[start:start + 512])
                subprocess.run(["sync"])
                _, committed = run(["qemu-img", "commit", "-q", overlay])
                records.append(emit({"op": "delete-merge", "vmm": "qemu-img commit (qcow2)", "mib": args.merge_mib,
                                     "total_ms": round(committed, 1), "ms_per_gib": round(committed * 1024 / args.merge_mib, 1)}))
            run([hv, "vm", "delete", "d"], env)

        for repeat in range(args.repeat):
            env = store(f"export-{repeat}")
            bundle = os.path.join(env["HVRUN_HOME"], "vms", "e")
            run([hv, "vm", "create", "e", "--kernel", args.guest, "--memory", "512M", "--new-disk", "1G",
                 "--cmdline", "steps=4000 ticks=2 cpus=1 blk=1 touch=32"], env)
            run([hv, "vm", "start", "e"], env)
            wait_steps(bundle + "/console.log", 30)
            run([hv, "vm", "save", "e"], env)
            exports = os.path.join(work, f"exports-{repeat}")
            shutil.rmtree(exports, ignore_errors=True)
            os.makedirs(exports)
            _, exported = run([hv, "vm", "export", "e", exports], env)
            floor_copy = os.path.join(work, f"cp-{repeat}")
            shutil.rmtree(floor_copy, ignore_errors=True)
            _, copied = run(["cp", "-r", "--sparse=always", bundle, floor_copy])
            other = store(f"import-{repeat}")
            _, imported = run([hv, "vm", "import", os.path.join(exports, "e"), "--mode", "restore"], other)
            size = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(floor_copy) for f in fs)
            records.append(emit({"op": "export", "ms": round(exported, 1), "cp_r_ms": round(copied, 1), "bundle_mib": size >> 20}))
            records.append(emit({"op": "import-restore", "ms": round(imported, 1), "cp_r_ms": round(copied, 1)}))
            run([hv, "vm", "delete", "e"], env)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    if args.table:
        def median(op, key, **match):
            values = [r[key] for r in records if r["op"] == op and all(r.get(k) == v for k, v in match.items())]
            return statistics.median(values) if values else None
        lines = ["| Measurement | hvrun | peer |", "|---|---|---|"]
        for memory in [int(m) for m in args.memory.split(",")]:
            lines.append(f"| checkpoint of a running {memory} MiB guest (32 MiB touched): pause | {median('checkpoint', 'pause_ms', memory_mib=memory)} ms | |")
            lines.append(f"| … total command time | {median('checkpoint', 'total_ms', memory_mib=memory)} ms | |")
            lines.append(f"| apply (running {memory} MiB VM: off, new children, saved) | {median('apply', 'total_ms', memory_mib=memory)} ms | |")
        hv_merge = median("delete-merge", "ms_per_gib", vmm="hvrun")
        qemu_merge = median("delete-merge", "ms_per_gib", vmm="qemu-img commit (qcow2)")
        lines.append(f"| delete: merge per GiB of differencing data | {hv_merge} ms | qemu-img commit (qcow2): {qemu_merge} ms |")
        lines.append(f"| export of a saved 512 MiB VM | {median('export', 'ms')} ms | cp -r: {median('export', 'cp_r_ms')} ms |")
        lines.append(f"| import --mode restore | {median('import-restore', 'ms')} ms | cp -r: {median('import-restore', 'cp_r_ms')} ms |")
        print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
