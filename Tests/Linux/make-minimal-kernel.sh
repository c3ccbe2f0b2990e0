#!/bin/sh
# Builds a minimal Linux for HyperCore on PVM hosts from Debian's linux-source package:
#
#   Tests/Linux/make-minimal-kernel.sh [OUT]      (default OUT: .build/linux-guest)
#
# OUT/vmlinux-minimal       the kernel (ELF with symbols, boots through PVH)
# OUT/System.map-minimal    its symbol table (for HYPERCORE_SAMPLE_RIP and Tests/Linux/symbolize.py)
# OUT/initramfs.cpio        the recipe's initramfs, uncompressed (from OUT/initramfs.cpio.gz, which
#                           Tests/Linux/make-guest.sh builds; run that first)
#
# Why: on PVM hosts every kernel instruction runs in KVM's emulator, and Debian's cloud kernel
# spends most of its boot on work proportional to its size and on a 250 Hz tick
# (Docs/linux-boot.md). The configuration is `make tinyconfig` plus Tests/Linux/minimal.config.
#
# Cost: one download of about 140 MB, about 1.3 GB unpacked, and a build of about 820 objects:
# 11 minutes on 2 loaded cores (measured), so this is not part of CI.
#
# Host tools: apt-get, dpkg-deb, xz, gcc, make, flex, bison, bc, perl, and libelf-dev (objtool).
set -eu

out=${1:-.build/linux-guest}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/minimal-src"

say() { printf 'make-minimal-kernel: %s\n' "$*" >&2; }
die() { printf 'make-minimal-kernel: error: %s\n' "$*" >&2; exit 1; }
for tool in apt-get dpkg-deb xz gcc make flex bison bc perl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is needed (apt-get install gcc make flex bison bc libelf-dev xz-utils)"
done
[ -f "$out/initramfs.cpio.gz" ] || die "$out/initramfs.cpio.gz is missing: run Tests/Linux/make-guest.sh first"

# 1. The source: linux-source is a metapackage whose Depends names linux-source-X.Y.
rm -rf "$work"
mkdir -p "$work/deb"
cd "$work/deb"
say "downloading linux-source"
apt-get download linux-source >/dev/null 2>&1 || die "apt-get download linux-source failed (run apt-get update first?)"
package=$(dpkg-deb -f linux-source_*.deb Depends | sed -n 's/^\(linux-source-[0-9.]*\).*/\1/p')
[ -n "$package" ] || die "cannot find the source package in linux-source's Depends"
say "downloading $package"
apt-get download "$package" >/dev/null 2>&1 || die "apt-get download $package failed"
dpkg-deb --fsys-tarfile "$package"_*.deb | tar -x -C "$work" --wildcards './usr/src/linux-source-*.tar.xz'
xz -dc "$work"/usr/src/linux-source-*.tar.xz | tar -x -C "$work"
src=$(ls -d "$work"/linux-source-*/ | head -n 1)
rm -rf "$work/deb" "$work/usr"

# 2. The configuration: tinyconfig, then each line of minimal.config.
cd "$src"
make -s ARCH=x86_64 tinyconfig
grep -E '^CONFIG_[A-Z0-9_]+=[yn]$' "$here/minimal.config" | while IFS='=' read -r name value; do
    if [ "$value" = y ]; then scripts/config -e "${name#CONFIG_}"; else scripts/config -d "${name#CONFIG_}"; fi
done
make -s ARCH=x86_64 olddefconfig
for option in PVH KVM_GUEST HZ_100 SERIAL_8250_CONSOLE BLK_DEV_INITRD DEVMEM; do
    grep -q "^CONFIG_$option=y" .config || die "CONFIG_$option did not stay set after olddefconfig"
done

# 3. Build (vmlinux only: PVH boots the ELF).
say "building vmlinux (about 820 objects)"
make -s -j"$(nproc)" ARCH=x86_64 vmlinux
cp vmlinux "$out/vmlinux-minimal"
cp System.map "$out/System.map-minimal"
gzip -dc "$out/initramfs.cpio.gz" > "$out/initramfs.cpio"
release=$(make -s ARCH=x86_64 kernelrelease)
cd "$out"
rm -rf "$work"
say "done: $out/vmlinux-minimal (Linux $release), $out/initramfs.cpio"
