// libFuzzer target over the VHDX open path: headers, region tables, metadata, BAT, log replay,
// then reads, `check`, and a write + flush on a writable open.
//
// Inputs are patches onto valid template images (so the fuzzer spends its time past the 1 MiB
// header section), with an option to recompute the checksums after patching so mutations reach the
// structure decoders rather than stopping at a CRC mismatch:
//   byte 0: flags — bit 0: template (dynamic with a pending log / differencing), bit 1: fix CRCs,
//           bit 2: also open read-write, bit 3: run `check`, bits 4-7: file length adjustment (in 64 KiB steps)
//   then records: offset (3 bytes LE, within the first 16 MiB), length (1 byte), bytes.
//
// Build and run (see Docs/VHDX.md):
//   swift build -c release --scratch-path .build-fuzz --product vhdx-fuzz \
//     -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xswiftc -DVHDX_FUZZ
//   .build-fuzz/release/vhdx-fuzz -runs=10000000 Tests/Fuzz/corpus
// Without -DVHDX_FUZZ this builds a plain executable that runs the given input files through the
// same code (regression replay of crashing inputs).
import HyperCore
import CKVM
#if canImport(Glibc)
import Glibc
#endif

enum Templates {
    /// A template kept sparse: its size and its non-zero 4 KiB pages (copying whole multi-MiB
    /// images per input would dominate the fuzzer's time).
    struct Sparse {
        var size: UInt64
        var pages: [(offset: UInt64, bytes: [UInt8])]
    }

    /// Two small valid images: [dynamic with data and a pending log, differencing child with a pending log].
    nonisolated(unsafe) static var images: [Sparse] = []

    static func build() {
        guard images.isEmpty else { return }
        let dir = "/tmp/vhdx-fuzz-templates-\(getpid())"
        mkdir(dir, 0o755)
        defer { unlink(dir + "/a.vhdx"); unlink(dir + "/b.avhdx"); rmdir(dir) }
        do {
            try VHDXImage.create(path: dir + "/a.vhdx", options: VHDXCreateOptions(virtualSize: 5 << 20, blockSize: 1 << 20))
            let a = try VHDXImage(path: dir + "/a.vhdx")
            try [UInt8](repeating: 0xA5, count: 8192).withUnsafeBytes { try a.write($0, at: 1 << 20) }
            try a.close()
            try VHDXImage.create(path: dir + "/b.avhdx", options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: dir + "/a.vhdx"))
            let b = try VHDXImage(path: dir + "/b.avhdx")
            try [UInt8](repeating: 0x5A, count: 4096).withUnsafeBytes { try b.write($0, at: 3 << 20) }
            try b.flush()
            try [UInt8](repeating: 0x5B, count: 4096).withUnsafeBytes { try b.write($0, at: 2 << 20) }
            try b.flush()
            b.abandon()   // never closed: the log stays pending
            let a2 = try VHDXImage(path: dir + "/a.vhdx")
            try [UInt8](repeating: 0x77, count: 512).withUnsafeBytes { try a2.write($0, at: 4 << 20) }
            try a2.flush()
            a2.abandon()
            images = [sparse(try read(dir + "/a.vhdx")), sparse(try read(dir + "/b.avhdx"))]
        } catch {
            fatalError("cannot build fuzz templates: \(error)")
        }
    }

    static func sparse(_ bytes: [UInt8]) -> Sparse {
        var pages: [(offset: UInt64, bytes: [UInt8])] = []
        for p in stride(from: 0, to: bytes.count, by: 4096) {
            let page = Array(bytes[p..<min(bytes.count, p + 4096)])
            if page.contains(where: { $0 != 0 }) { pages.append((UInt64(p), page)) }
        }
        return Sparse(size: UInt64(bytes.count), pages: pages)
    }

    /// Materialises a template in a fresh memfd, applies the input's patches and length change.
    static func materialise(_ t: Sparse, patches: [(UInt64, [UInt8])], adjust: Int, fixCRCs: Bool) throws -> DiskFile {
        let file = try DiskFile.inMemory([])
        try file.truncate(to: t.size)
        for p in t.pages { try file.write(p.bytes, at: p.offset) }
        for (o, bytes) in patches { try file.write(bytes, at: o) }
        if fixCRCs { try FuzzSupport.fixChecksums(file) }
        let size = try file.size()
        if adjust >= 8 {
            try file.truncate(to: size - min(size, UInt64(adjust - 7) * 65536))
        } else if adjust > 0 {
            try file.truncate(to: size + UInt64(adjust) * 65536)
        }
        return file
    }

    static func read(_ path: String) throws -> [UInt8] {
        let f = try DiskFile(path: path, readOnly: true)
        return try f.read(count: Int(try f.size()), at: 0)
    }
}

func runOne(_ input: UnsafeRawBufferPointer) {
    Templates.build()
    guard input.count >= 1 else { return }
    let flags = input[0]
    let template = Templates.images[Int(flags & 1)]
    var patches: [(UInt64, [UInt8])] = []
    var i = 1
    while i + 4 <= input.count {
        let offset = UInt64(input[i]) | UInt64(input[i + 1]) << 8 | UInt64(input[i + 2]) << 16
        let n = min(Int(input[i + 3]), input.count - (i + 4))
        i += 4
        patches.append((offset, Array(input[i..<i + n])))
        i += n
    }
    let adjust = Int(flags >> 4)
    do {
        let file = try Templates.materialise(template, patches: patches, adjust: adjust, fixCRCs: flags & 2 != 0)
        let readOnly = DiskFile(adopting: dup(file.fd), path: file.path, readOnly: true)
        do {
            let vhdx = try VHDXImage(file: readOnly, options: .init(readOnly: true, openParents: false))
            var buffer = [UInt8](repeating: 0, count: 8192)
            let size = vhdx.virtualSize
            for offset in [0, size / 2, size >= 8192 ? size - 8192 : 0]
            where offset % UInt64(vhdx.logicalSectorSize) == 0 && offset + 8192 <= size {
                try? buffer.withUnsafeMutableBytes { try vhdx.read(into: $0, at: offset) }
            }
            if flags & 8 != 0 { _ = VHDXImage.check(path: file.path) }
        } catch {}
        if flags & 4 != 0 {
            let vhdx = try VHDXImage(file: file, options: .init(readOnly: false, openParents: false))
            try? [UInt8](repeating: 0x42, count: 4096).withUnsafeBytes { try vhdx.write($0, at: 0) }
            try? vhdx.flush()
            try? vhdx.close()
        }
    } catch {}
}

#if VHDX_FUZZ
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    runOne(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

/// SwiftPM links executables with `main` renamed to `vhdx_fuzz_main`; hand control to libFuzzer.
@_cdecl("vhdx_fuzz_main")
public func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzzOne(data, size) }
}
#else
@main
struct VHDXFuzzReplay {
    static func main() {
        for path in CommandLine.arguments.dropFirst() {
            guard let bytes = try? Templates.read(path) else { print("cannot read \(path)"); continue }
            bytes.withUnsafeBytes { runOne($0) }
            print("ok: \(path)")
        }
    }
}
#endif
