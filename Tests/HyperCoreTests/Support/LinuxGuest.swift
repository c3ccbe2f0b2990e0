import HyperCore
import Testing
#if canImport(Glibc)
import Glibc
#endif
import CKVM

/// The real Linux guest built by `Tests/Linux/make-guest.sh` (Debian's cloud kernel, its vmlinux
/// and a busybox initramfs), and what this host can do with it.
enum LinuxGuest {
    static let directory = TestHost.repositoryRoot + "/.build/linux-guest"
    static let recipe = "Tests/Linux/make-guest.sh"
    static var bzImagePath: String { directory + "/bzImage" }
    static var vmlinuxPath: String { directory + "/vmlinux" }
    static var initramfsPath: String { directory + "/initramfs.cpio.gz" }

    /// The minimal kernel of `Tests/Linux/make-minimal-kernel.sh` and the uncompressed initramfs.
    static var minimalVmlinuxPath: String { directory + "/vmlinux-minimal" }
    static var plainInitramfsPath: String { directory + "/initramfs.cpio" }
    static let minimalAvailable: Bool = [minimalVmlinuxPath, plainInitramfsPath].allSatisfy { (path: String) in access(path, R_OK) == 0 }
    static let minimalMissingReason: Comment =
        "the minimal kernel is not built: run Tests/Linux/make-guest.sh, then Tests/Linux/make-minimal-kernel.sh (a kernel build: about 11 minutes on 2 cores, so not in CI)"

    static let available: Bool = [bzImagePath, vmlinuxPath, initramfsPath].allSatisfy { (path: String) in access(path, R_OK) == 0 }
    static let missingReason: Comment =
        "the Linux guest is not built: run \(recipe) (needs apt-get, dpkg-deb, lz4) to fetch Debian's kernel into .build/linux-guest"

    /// Whether KVM here can run an unmodified Linux kernel to the end: hardware virtualisation
    /// (kvm_intel or kvm_amd loaded, VMX or SVM in CPUID) and not the PVM backend, whose CPL0
    /// instruction emulator stops Linux early (see Docs/hosts.md).
    static let hostRunsLinux: Bool = {
        guard TestHost.kvmUsable, access("/sys/module/kvm_pvm", F_OK) != 0 else { return false }
        let intel = access("/sys/module/kvm_intel", F_OK) == 0
        let amd = access("/sys/module/kvm_amd", F_OK) == 0
        let vmx = ckvm_host_cpuid(1, 0).ecx & (1 << 5) != 0
        let svm = ckvm_host_cpuid(0x8000_0001, 0).ecx & (1 << 2) != 0
        return (intel && vmx) || (amd && svm)
    }()

    static var hostComment: Comment { Comment(rawValue: "cannot run Linux to init here: " + hostReason) }

    static var hostReason: String {
        if access("/sys/module/kvm_pvm", F_OK) == 0 {
            return "KVM here is the PVM backend (nested): every guest CPL0 instruction runs in KVM's instruction emulator, so Debian's kernel needs more than 10 minutes to its init, and the init's first syscall faults (Docs/linux-boot.md)"
        }
        return "no kvm_intel/kvm_amd with VMX/SVM on this host"
    }
}

/// A bzImage-shaped file with chosen header fields, for parser and loader tests.
enum CraftedBzImage {
    struct Fields {
        var setupSectors: UInt8 = 4
        var version: UInt16 = 0x020F
        var loadflags: UInt8 = 0x01
        var xloadflags: UInt16 = 0x03
        var relocatable: UInt8 = 1
        var kernelAlignment: UInt32 = 0x20_0000
        var preferredAddress: UInt64 = 0x100_0000
        var initSize: UInt32 = 0x40_0000
        var commandLineSize: UInt32 = 2047
        var initrdAddressMax: UInt32 = 0x7FFF_FFFF
        var kernelSize = 0x2000
        var syssizeOverride: UInt32?
        var magic: [UInt8] = Array("HdrS".utf8)
        var bootFlag: UInt16 = 0xAA55
    }

    static func make(_ fields: Fields = Fields()) -> [UInt8] {
        let kernelOffset = (Int(fields.setupSectors == 0 ? 4 : fields.setupSectors) + 1) * 512
        var bytes = [UInt8](repeating: 0, count: kernelOffset + fields.kernelSize)
        func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
            for index in 0..<(T.bitWidth / 8) { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
        }
        put(fields.setupSectors, 0x1F1)
        put(fields.syssizeOverride ?? UInt32(fields.kernelSize / 16), 0x1F4)
        put(fields.bootFlag, 0x1FE)
        bytes[0x200] = 0xEB
        bytes[0x201] = 0x6A // header ends at 0x26C
        bytes.replaceSubrange(0x202..<0x206, with: fields.magic)
        put(fields.version, 0x206)
        put(fields.loadflags, 0x211)
        put(UInt32(0x100000), 0x214)
        put(fields.initrdAddressMax, 0x22C)
        put(fields.kernelAlignment, 0x230)
        put(fields.relocatable, 0x234)
        put(fields.xloadflags, 0x236)
        put(fields.commandLineSize, 0x238)
        put(fields.preferredAddress, 0x258)
        put(fields.initSize, 0x260)
        // A recognisable protected-mode kernel: byte i = i & 0xFF, preceded by a marker.
        for index in 0..<fields.kernelSize { bytes[kernelOffset + index] = UInt8(truncatingIfNeeded: index) }
        return bytes
    }
}

extension Array where Element == UInt8 {
    func u16(_ offset: Int) -> UInt16 { UInt16(self[offset]) | UInt16(self[offset + 1]) << 8 }
    func u32(_ offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[offset + $1]) << (8 * $1) } }
    func u64(_ offset: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(self[offset + $1]) << (8 * $1) } }
}
