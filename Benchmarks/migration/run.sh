#!/usr/bin/env bash
# Live migration, hvrun and QEMU 7.2 side by side in one run (see migration.py for the cases and
# what is measured). Environment: HVRUN (default .build-static/release/hvrun, the fully static
# release build Scripts/install.sh makes and installs: the build a user gets), REPEAT (3), CASES,
# MAX_DOWNTIME (hvrun's --max-downtime, default 10 ms), DIRTY_LOGS (hvrun's --dirty-log values,
# default manual; manual,classic runs both, the second labelled hvrun-classic), QEMU_DEFAULT=1 (also
# QEMU at its default 32 MiB/s cap, labelled qemu-default).
# stdout: one JSON line per run; stderr at the end: a Markdown table of medians.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
hvrun=${HVRUN:-$root/.build-static/release/hvrun}
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)" >&2; exit 1; }
[ -x "$hvrun" ] || { echo "no hvrun at $hvrun (Scripts/install.sh --build-only, or set HVRUN)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
make -s -C "$root/Tests/Guests" OUT="$out" "$out/stateful.elf" >&2
python3 "$here/migration.py" --guest "$out/stateful.elf" --hvrun "$hvrun" --repeat "${REPEAT:-3}" \
	--cases "${CASES:-idle512,dirty512,dirty2g}" --max-downtime "${MAX_DOWNTIME:-10}" \
	--dirty-logs "${DIRTY_LOGS:-manual}" ${QEMU_DEFAULT:+--qemu-default} | tee "$out/results.jsonl"
python3 - "$out/results.jsonl" >&2 <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| case | VMM | total ms | downtime ms (VMM) | longest guest gap ms | guest tick before ms | gap − tick ms | passes | runs |")
print("|---|---|---|---|---|---|---|---|---|")
for case in dict.fromkeys(r["case"] for r in rows):
    for vmm in dict.fromkeys(r["vmm"] for r in rows):
        ok = [r for r in rows if r["case"] == case and r["vmm"] == vmm and "error" not in r]
        bad = [r for r in rows if r["case"] == case and r["vmm"] == vmm and "error" in r]
        if not ok:
            print("| %s | %s | – | – | – | – | – | – | 0 (%d failed) |" % (case, vmm, len(bad)))
            continue
        med = lambda k: statistics.median(float(r[k]) for r in ok)
        print("| %s | %s | %.0f | %.1f | %.1f | %.1f | %.1f | %.0f | %d%s |" % (case, vmm, med("total_ms"), med("downtime_ms"),
              med("guest_gap_ms"), med("baseline_tick_ms"), med("gap_excess_ms"), med("passes"), len(ok),
              " (%d failed)" % len(bad) if bad else ""))
PY
