#!/usr/bin/env bash
# Builds hvrun the way its speed and memory numbers are measured — release, fully static
# (-static-executable: no dynamic loader, no relocation of Swift metadata at start-up) — and
# installs it on PATH.
#
#   Scripts/install.sh                  # installs to ~/.local/bin/hvrun
#   PREFIX=/usr/local Scripts/install.sh   # installs to /usr/local/bin/hvrun
#   Scripts/install.sh --build-only     # only builds; prints the binary's path
#
# The build goes to .build-static/ (kept apart from `swift build`'s .build/, so the two never
# rebuild each other). Benchmarks/run.sh measures exactly this binary.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PREFIX=${PREFIX:-$HOME/.local}
SCRATCH=${SCRATCH:-$root/.build-static}

swift build -c release --scratch-path "$SCRATCH" -Xswiftc -static-executable --product hvrun >&2
binary="$SCRATCH/release/hvrun"
if [[ ${1:-} == --build-only ]]; then
    echo "$binary"
    exit 0
fi
install -d "$PREFIX/bin"
install -m 0755 "$binary" "$PREFIX/bin/hvrun"
echo "installed $PREFIX/bin/hvrun" >&2
case ":$PATH:" in
    *":$PREFIX/bin:"*) ;;
    *) echo "note: $PREFIX/bin is not on PATH; add it, e.g. export PATH=\"$PREFIX/bin:\$PATH\"" >&2 ;;
esac
