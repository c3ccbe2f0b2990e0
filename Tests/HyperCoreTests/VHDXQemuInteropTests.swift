import Foundation
import Testing
@testable import HyperCore

/// qemu-img and qemu-io as independent peers: images they make read back identically through our
/// reader, and images we make pass their checks and read back identically through theirs.
@Suite(.serialized) struct VHDXQemuInteropTests {
    struct QemuImage: CustomTestStringConvertible, Sendable {
        var size: String
        var options: String
        /// qemu-io writes: (pattern byte, offset, length).
        var writes: [(UInt8, UInt64, UInt64)]
        var testDescription: String { "\(size) \(options)" }
    }

    static let images: [QemuImage] = [
        QemuImage(size: "96M", options: "block_size=1M", writes: [(0xa5, 0, 4096), (0x5a, 1048064, 1024), (0x33, 100662272, 512)]),
        QemuImage(size: "100000K", options: "block_size=8M,block_state_zero=off", writes: [(0x11, 8 << 20, 64 << 10), (0x22, 102399488, 512)]),
        QemuImage(size: "6G", options: "block_size=2M", writes: [(0xa5, 0, 4096), (0x5a, (4 << 30) - (1 << 20), 2 << 20), (0x77, (6 << 30) - 512, 512)]),
        QemuImage(size: "200M", options: "subformat=fixed,block_state_zero=off,block_size=32M", writes: [(0x44, 33 << 20, 1 << 20), (0x45, (200 << 20) - 4096, 4096)]),
        QemuImage(size: "64M", options: "subformat=fixed,block_size=16M", writes: [(0x46, 17 << 20, 12288)]),
    ]

    @Test(arguments: images)
    func qemuMadeImagesReadBackIdentically(_ spec: QemuImage) throws {
        guard VHDXTestSupport.hasQemu else { print("skipped: qemu-img/qemu-io not installed"); return }
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let vhdx = dir + "/q.vhdx", raw = dir + "/q.raw"
        let created = VHDXTestSupport.qemuImg(["create", "-f", "vhdx", "-o", spec.options, vhdx, spec.size])
        try #require(created.status == 0, "\(created.output)")
        var ioArgs: [String] = []
        for (p, o, l) in spec.writes { ioArgs += ["-c", "write -P 0x\(String(p, radix: 16)) \(o) \(l)"] }
        let wrote = VHDXTestSupport.qemuIO(ioArgs + [vhdx])
        try #require(wrote.status == 0, "\(wrote.output)")
        let converted = VHDXTestSupport.qemuImg(["convert", "-f", "vhdx", "-O", "raw", vhdx, raw])
        try #require(converted.status == 0, "\(converted.output)")

        let image = try VHDXImage(path: vhdx, options: .init(readOnly: true))
        let reference = try RawImage(path: raw, readOnly: true)
        #expect(image.virtualSize == reference.virtualSize)
        if image.virtualSize <= 512 << 20 {
            let ours = try VHDXTestSupport.readAll(image), theirs = try VHDXTestSupport.readAll(reference)
            #expect(VHDXTestSupport.firstDifference(ours, theirs) == nil)
        } else {
            // Large disks: every written range with a margin, plus the chunk boundary.
            var ranges: [(UInt64, Int)] = spec.writes.map { w in
                let start = w.1 >= (1 << 20) ? w.1 - (1 << 20) : 0
                return (start, Int(min(image.virtualSize - start, w.2 + (2 << 20))))
            }
            ranges.append((4 << 30, 1 << 20))
            for (o, n) in ranges {
                let ours = try VHDXTestSupport.read(image, at: o, count: n)
                let theirs = try VHDXTestSupport.read(reference, at: o, count: n)
                #expect(VHDXTestSupport.firstDifference(ours, theirs) == nil, "range at \(o)")
                #expect(ours.contains { $0 != 0 } || !spec.writes.contains { $0.1 >= o && $0.1 < o + UInt64(n) })
            }
        }
        // Our converter gives the same raw image as qemu-img's.
        if image.virtualSize <= 512 << 20 {
            let ourRaw = dir + "/ours.raw"
            try DiskConverter.convert(source: image, to: .init(path: ourRaw, format: .raw))
            #expect(VHDXTestSupport.fileBytes(ourRaw) == VHDXTestSupport.fileBytes(raw))
        }
    }

    @Test func ourImagesPassQemuAndReadBackIdentically() throws {
        guard VHDXTestSupport.hasQemu else { print("skipped: qemu-img/qemu-io not installed"); return }
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        // 6 GiB with 1 MiB blocks: chunk ratio 4096, so data past 4 GiB sits after the first
        // sector-bitmap entry and exercises the interleave.
        let path = dir + "/ours.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 6 << 30, type: .dynamic, blockSize: 1 << 20, physicalSectorSize: 512))
        let writes: [(UInt8, UInt64, Int)] = [
            (0xa5, 0, 4096), (0x5a, (4 << 30) - 4096, 8192), (0x6b, (4 << 30) + (3 << 20) + 512, 1536),
            (0x7c, (6 << 30) - 512, 512), (0x3d, (1 << 30) + 12345 * 512, 3 << 20),
        ]
        do {
            let image = try VHDXImage(path: path)
            for (p, o, n) in writes { try VHDXTestSupport.write(image, [UInt8](repeating: p, count: n), at: o) }
            try image.flush()
            try image.close()
        }
        let check = VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path])
        #expect(check.status == 0, "\(check.output)")
        var args: [String] = ["-r"]
        for (p, o, n) in writes { args += ["-c", "read -P 0x\(String(p, radix: 16)) \(o) \(n)"] }
        args += ["-c", "read -P 0 \(2 << 30) 65536", "-c", "read -P 0 \((4 << 30) + (3 << 20)) 512"]
        let read = VHDXTestSupport.qemuIO(args + [path])
        #expect(read.status == 0 && !read.output.contains("verification failed"), "\(read.output)")

        // A small disk compared whole through qemu-img convert.
        let small = dir + "/small.vhdx", raw = dir + "/small.raw"
        try VHDXImage.create(path: small, options: VHDXCreateOptions(virtualSize: 40 << 20, type: .dynamic, blockSize: 1 << 20))
        var expected = [UInt8](repeating: 0, count: 40 << 20)
        do {
            let image = try VHDXImage(path: small)
            var rng = SystemRandomNumberGenerator()
            for k in 0..<40 {
                let n = Int.random(in: 1...32, using: &rng) * 512
                let o = Int.random(in: 0...((40 << 20) - n) / 512, using: &rng) * 512
                let data = VHDXTestSupport.pattern(n, seed: UInt8(k))
                expected.replaceSubrange(o..<o + n, with: data)
                try VHDXTestSupport.write(image, data, at: UInt64(o))
                if k % 7 == 0 { try image.flush() }
            }
            try image.close()
        }
        #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", small]).status == 0)
        let conv = VHDXTestSupport.qemuImg(["convert", "-f", "vhdx", "-O", "raw", small, raw])
        try #require(conv.status == 0, "\(conv.output)")
        #expect(VHDXTestSupport.firstDifference(VHDXTestSupport.fileBytes(raw), expected) == nil)
    }

    @Test func weWriteIntoQemuMadeImagesAndQemuReadsIt() throws {
        guard VHDXTestSupport.hasQemu else { print("skipped: qemu-img/qemu-io not installed"); return }
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        // Default qemu images have ZERO-state BATs; fixed ones with block_state_zero=off are really fixed.
        for options in ["block_size=1M", "subformat=fixed,block_state_zero=off,block_size=8M", "block_size=1M,block_state_zero=off"] {
            let path = dir + "/q.vhdx"
            try? FileManager.default.removeItem(atPath: path)
            #expect(VHDXTestSupport.qemuImg(["create", "-f", "vhdx", "-o", options, path, "48M"]).status == 0)
            #expect(VHDXTestSupport.qemuIO(["-c", "write -P 0x11 0 1M", path]).status == 0)
            do {
                let image = try VHDXImage(path: path)
                try VHDXTestSupport.write(image, [UInt8](repeating: 0x22, count: 4096), at: 512 << 10)
                try VHDXTestSupport.write(image, [UInt8](repeating: 0x33, count: 8192), at: (40 << 20) + 512)
                try image.close()
            }
            let check = VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path])
            #expect(check.status == 0, "\(options): \(check.output)")
            let r = VHDXTestSupport.qemuIO(["-r", "-c", "read -P 0x11 0 512k", "-c", "read -P 0x22 \(512 << 10) 4096",
                                            "-c", "read -P 0x11 \((512 << 10) + 4096) \((512 << 10) - 4096)",
                                            "-c", "read -P 0x33 \((40 << 20) + 512) 8192", "-c", "read -P 0 \(40 << 20) 512", path])
            #expect(r.status == 0 && !r.output.contains("verification failed"), "\(options): \(r.output)")
        }
    }

    @Test func fixedImagesWeCreatePassQemu() throws {
        guard VHDXTestSupport.hasQemu else { print("skipped: qemu-img/qemu-io not installed"); return }
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/fixed.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 24 << 20, type: .fixed, blockSize: 8 << 20))
        do {
            let image = try VHDXImage(path: path)
            #expect(image.isFixed)
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x9e, count: 4096), at: 9 << 20)
            try image.close()
        }
        let size = try DiskFile(path: path, readOnly: true).size()
        #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path]).status == 0)
        let r = VHDXTestSupport.qemuIO(["-r", "-c", "read -P 0x9e \(9 << 20) 4096", "-c", "read -P 0 0 65536", path])
        #expect(r.status == 0 && !r.output.contains("verification failed"), "\(r.output)")
        #expect(try DiskFile(path: path, readOnly: true).size() == size, "writes into a fixed disk never grow the file")
    }
}
