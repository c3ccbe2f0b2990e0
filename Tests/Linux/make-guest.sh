#!/bin/sh
# Builds a Linux guest for HyperCore from Debian's packages:
#
#   Tests/Linux/make-guest.sh [OUT]        (default OUT: .build/linux-guest)
#
# OUT/bzImage               Debian's linux-image-cloud-amd64 kernel, as shipped
# OUT/vmlinux               the ELF kernel decompressed from inside that bzImage (boots through PVH)
# OUT/initramfs.cpio.gz     busybox, the kernel's virtio modules and an init (see below)
# OUT/kernel-version        the kernel release, e.g. 6.1.0-56-cloud-amd64
#
# Then:  hvrun run --kernel OUT/bzImage --initrd OUT/initramfs.cpio.gz --memory 512M \
#                  --cmdline "console=ttyS0 reboot=k panic=-1"
#
# The init mounts /proc, /sys and /dev, loads the virtio modules, prints the ready line
# "HYPERCORE-READY kernel=<release> uptime=<seconds>", writes the boot-timer marker (123 to
# MMIO 0xFEBFF000, see Sources/HyperCore/Devices/BootTimer.swift) and reboots, which ends
# `hvrun run` with status 0 (with reboot=k, through the i8042 reset line). With `hypercore.shell`
# on the kernel command line it starts a shell on the console instead.
#
# Host tools: apt-get and dpkg-deb (Debian/Ubuntu), lz4 (Debian's kernel payload is LZ4; gzip,
# xz, zstd or bzip2 are used if a kernel uses those), od and dd. Busybox itself (static, from
# the package) builds the archive (cpio, gzip) and the module index (depmod).
set -eu

out=${1:-.build/linux-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/deb" "$work/kernel" "$work/busybox" "$work/root"

say() { printf 'make-guest: %s\n' "$*" >&2; }
die() { printf 'make-guest: error: %s\n' "$*" >&2; exit 1; }
for tool in apt-get dpkg-deb od dd; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is needed (Debian/Ubuntu host)"
done

# 1. Download. linux-image-cloud-amd64 is a metapackage: its Depends names the real image.
cd "$work/deb"
say "downloading linux-image-cloud-amd64 and busybox-static"
apt-get download linux-image-cloud-amd64 busybox-static >/dev/null 2>&1 \
    || die "apt-get download failed (run apt-get update first?)"
image=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | sed -n 's/^\(linux-image-[^ ,]*\).*/\1/p')
[ -n "$image" ] || die "cannot find the kernel package in linux-image-cloud-amd64's Depends"
say "downloading $image"
apt-get download "$image" >/dev/null 2>&1 || die "apt-get download $image failed"
dpkg-deb -x "$image"_*.deb "$work/kernel"
dpkg-deb -x busybox-static_*.deb "$work/busybox"

# 2. The kernel: bzImage as shipped, and the vmlinux inside it.
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -n 1)
release=${vmlinuz##*/vmlinuz-}
cp "$vmlinuz" "$out/bzImage"
printf '%s\n' "$release" > "$out/kernel-version"

u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects=$(u8 "$out/bzImage" $((0x1F1)))
[ "$setup_sects" -eq 0 ] && setup_sects=4
payload_offset=$(u32 "$out/bzImage" $((0x248)))
payload_length=$(u32 "$out/bzImage" $((0x24C)))
start=$(( (setup_sects + 1) * 512 + payload_offset ))
dd if="$out/bzImage" of="$work/payload" bs=4096 iflag=skip_bytes,count_bytes \
    skip="$start" count="$payload_length" 2>/dev/null
magic=$(od -An -tx1 -N6 "$work/payload" | tr -d ' \n')
# The payload ends with the decompressed size (4 bytes), which some tools call trailing garbage:
# their status is ignored and the result checked instead.
case "$magic" in
    02214c18*) command -v lz4 >/dev/null || die "the kernel is LZ4-compressed: install lz4"
               lz4 -dc "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
    1f8b*)     gzip -dc "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
    fd377a585a00) xz -dc --single-stream "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
    28b52ffd*) zstd -dc "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
    425a68*)   bzip2 -dc "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
    *)         die "unknown kernel payload compression (magic $magic)" ;;
esac
[ "$(od -An -tx1 -N4 "$out/vmlinux" | tr -d ' \n')" = 7f454c46 ] || die "decompressing the payload did not give an ELF vmlinux"

# 3. The initramfs: busybox, virtio modules (with their dependencies), an init.
bb="$work/busybox/bin/busybox"
root="$work/root"
mkdir -p "$root/bin" "$root/sbin" "$root/etc" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root"
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
for applet in init modprobe insmod depmod reboot poweroff; do ln -sf ../bin/busybox "$root/sbin/$applet"; done

moddir="lib/modules/$release"
mkdir -p "$root/$moddir"
cp "$work/kernel/$moddir"/modules.builtin "$work/kernel/$moddir"/modules.order "$root/$moddir/" 2>/dev/null || true
wanted="virtio virtio_ring virtio_pci virtio_pci_legacy_dev virtio_pci_modern_dev virtio_mmio virtio_blk
        virtio_net net_failover failover virtio_console virtio-rng virtio_balloon vmw_vsock_virtio_transport
        vmw_vsock_virtio_transport_common vsock"
for name in $wanted; do
    file=$(find "$work/kernel/$moddir/kernel" -name "$name.ko*" | head -n 1)
    [ -n "$file" ] || { say "module $name not in this kernel (built in or absent)"; continue; }
    rel=${file#"$work/kernel/$moddir/"}
    mkdir -p "$root/$moddir/$(dirname "$rel")"
    cp "$file" "$root/$moddir/$rel"
done
"$bb" depmod -b "$root" "$release"

cat > "$root/init" <<'INIT'
#!/bin/sh
# HyperCore guest init: mount the kernel filesystems, load virtio, report ready, reboot.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
for module in virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtio-rng virtio_balloon vmw_vsock_virtio_transport; do
    modprobe "$module" 2>/dev/null
done
read -r uptime _ < /proc/uptime
echo "HYPERCORE-READY kernel=$(uname -r) uptime=$uptime"
# The boot-timer marker (HyperCore BootTimer: 123 at MMIO 0xFEBFF000).
devmem 0xfebff000 8 123 2>/dev/null
if grep -q 'hypercore.shell' /proc/cmdline; then
    echo "HyperCore: shell on the console; 'reboot -f' ends the VM"
    exec setsid cttyhack sh
fi
sync
reboot -f
INIT
chmod 755 "$root/init"

(cd "$root" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null | "$bb" gzip -9) > "$out/initramfs.cpio.gz"
rm -rf "$work"
say "done: $out/bzImage, $out/vmlinux, $out/initramfs.cpio.gz (kernel $release)"
