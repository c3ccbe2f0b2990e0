/// What happened when the probe looked at, opened and exercised `/dev/kvm`.
public struct KVMDeviceFacts: Hashable, Sendable {
    public enum FileType: String, Hashable, Sendable {
        case characterDevice = "char", regularFile = "regular", directory, other
    }

    /// `stat(2)` of the device node.
    public struct Node: Hashable, Sendable {
        public var type: FileType
        public var major: UInt32
        public var minor: UInt32
        /// Permission bits only (e.g. 0o660).
        public var mode: UInt32
        public var ownerUID: UInt32
        public var groupID: UInt32

        public init(type: FileType, major: UInt32, minor: UInt32, mode: UInt32, ownerUID: UInt32, groupID: UInt32) {
            self.type = type
            self.major = major
            self.minor = minor
            self.mode = mode
            self.ownerUID = ownerUID
            self.groupID = groupID
        }
    }

    /// A step that either worked or failed with an errno.
    public enum Outcome: Hashable, Sendable {
        case succeeded
        case failed(ProbeError)
    }

    /// `stat("/dev/kvm")`: `.failure(.noSuchFile)` when it does not exist.
    public var node: Result<Node, ProbeError>
    /// `open(O_RDWR)`; nil when not attempted (no node, or not a character device).
    public var open: Outcome?
    /// `KVM_GET_API_VERSION`; nil when not attempted.
    public var apiVersion: Result<Int32, ProbeError>?
    /// `KVM_CHECK_EXTENSION` results by capability name; empty when not attempted.
    public var capabilities: [String: Int32]
    /// `KVM_CREATE_VM(0)`; nil when not attempted.
    public var createVM: Outcome?
    /// `KVM_CREATE_VCPU(0)` on that VM; nil when not attempted.
    public var createVCPU: Outcome?

    public init(
        node: Result<Node, ProbeError>, open: Outcome? = nil, apiVersion: Result<Int32, ProbeError>? = nil,
        capabilities: [String: Int32] = [:], createVM: Outcome? = nil, createVCPU: Outcome? = nil
    ) {
        self.node = node
        self.open = open
        self.apiVersion = apiVersion
        self.capabilities = capabilities
        self.createVM = createVM
        self.createVCPU = createVCPU
    }

    /// The only API version there has ever been; api.rst: applications should refuse any other.
    public static let expectedAPIVersion: Int32 = 12
}
