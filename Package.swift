// swift-tools-version: 6.1
import PackageDescription

let strictSwift: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "HyperCore",
    products: [
        .library(name: "HyperCore", targets: ["HyperCore"]),
        .executable(name: "hvrun", targets: ["hvrun"]),
        .executable(name: "virtqueue-fuzz", targets: ["virtqueue-fuzz"]),
        .executable(name: "vhdx-fuzz", targets: ["vhdx-fuzz"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.0"),
    ],
    targets: [
        // The C shim: KVM ioctl numbers and structs, non-variadic ioctl wrappers,
        // host CPUID/MSR probes and the vCPU kick signal handler.
        .target(
            name: "CKVM",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .target(
            name: "HyperCore",
            dependencies: [
                "CKVM",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "hvrun",
            dependencies: [
                "HyperCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "HyperCoreTests",
            dependencies: [
                "HyperCore", "CKVM", "DiskTestWorkload", "disk-test-tool",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            exclude: ["Fixtures"],
            swiftSettings: strictSwift
        ),
        // Test support, not products: the crash test's deterministic workload, and the process the
        // crash test kills and Benchmarks/disk times (Tests/DiskTestSupport/Tool/main.swift).
        .target(
            name: "DiskTestWorkload",
            path: "Tests/DiskTestSupport/Workload",
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "disk-test-tool",
            dependencies: ["HyperCore", "DiskTestWorkload"],
            path: "Tests/DiskTestSupport/Tool",
            swiftSettings: strictSwift
        ),
        // libFuzzer target over the virtqueue walker (Docs/virtio.md); a replay tool in normal builds.
        .executableTarget(
            name: "virtqueue-fuzz",
            dependencies: ["HyperCore"],
            path: "Tests/Fuzz/VirtqueueFuzz",
            swiftSettings: strictSwift
        ),
        // libFuzzer target over the VHDX open path. A plain build makes a replay tool; the fuzzer
        // build adds -sanitize=fuzzer,address -parse-as-library -DVHDX_FUZZ (see Docs/VHDX.md).
        .executableTarget(
            name: "vhdx-fuzz",
            dependencies: ["HyperCore", "CKVM"],
            path: "Tests/Fuzz/VHDXFuzz",
            swiftSettings: strictSwift
        ),
    ],
    swiftLanguageModes: [.v6]
)
