#!/usr/bin/env python3
"""Maps kernel addresses in text to symbol+offset with a System.map.

    Tests/Linux/symbolize.py System.map < hvrun-stderr.txt
    Tests/Linux/symbolize.py System.map --profile < hvrun-stderr.txt

Every 0xffffffff........ in the input (the RIPs and stack values of HYPERCORE_SAMPLE_RIP
samples) gets its symbol appended as [symbol+0xoff]. --profile prints instead how often each
function was the sampled RIP, most frequent first. Debian's linux-image package ships a stub
System.map; the real one is in linux-image-<release>-dbg (usr/lib/debug/boot/System.map-<release>).
"""
import bisect
import re
import sys

def load(path):
    symbols = []
    with open(path) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwWaA" and len(parts[0]) == 16:
                symbols.append((int(parts[0], 16), parts[2]))
    symbols.sort()
    if len(symbols) < 100:
        sys.exit(f"{path}: fewer than 100 text symbols (Debian's stub? use the -dbg package's System.map)")
    return [address for address, _ in symbols], [name for _, name in symbols]

def name(addresses, names, value):
    index = bisect.bisect_right(addresses, value) - 1
    if index < 0:
        return None
    return f"{names[index]}+{value - addresses[index]:#x}"

def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    addresses, names = load(sys.argv[1])
    pattern = re.compile(r"0xffffffff[0-9a-f]{8}")
    if "--profile" in sys.argv[2:]:
        counts = {}
        total = 0
        for line in sys.stdin:
            match = re.search(r"rip=(0xffffffff[0-9a-f]{8})", line)
            if not match:
                continue
            symbol = (name(addresses, names, int(match.group(1), 16)) or "?").split("+")[0]
            counts[symbol] = counts.get(symbol, 0) + 1
            total += 1
        for symbol, count in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"{count:6d} {100.0 * count / max(total, 1):5.1f}%  {symbol}")
        return
    for line in sys.stdin:
        def replace(match):
            symbol = name(addresses, names, int(match.group(0), 16))
            return f"{match.group(0)}[{symbol}]" if symbol else match.group(0)
        sys.stdout.write(pattern.sub(replace, line))

main()
