// CKVM: the thin C layer under HyperCore.
//
// Swift cannot import function-like macros (every KVM ioctl number is one), cannot call variadic
// ioctl(2), and must not run arbitrary Swift inside a signal handler. This header fixes exactly
// those three gaps and nothing else: ioctl numbers re-exported as an enum of unsigned long,
// fixed-arity ioctl wrappers, the vCPU kick handler, and host CPU probes (CPUID, MSR).
#ifndef CKVM_H
#define CKVM_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - ioctl numbers

// A fixed underlying type keeps _IOR/_IOW values above INT_MAX intact; Swift imports these as UInt.
enum : unsigned long {
    // System (/dev/kvm)
    CKVM_GET_API_VERSION = KVM_GET_API_VERSION,
    CKVM_CREATE_VM = KVM_CREATE_VM,
    CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION,
    CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE,
    CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID,
    CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST,
    // VM
    CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION,
    CKVM_CREATE_VCPU = KVM_CREATE_VCPU,
    CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP,
    CKVM_CREATE_PIT2 = KVM_CREATE_PIT2,
    CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR,
    CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR,
    CKVM_IRQ_LINE = KVM_IRQ_LINE,
    CKVM_IRQ_LINE_STATUS = KVM_IRQ_LINE_STATUS,
    CKVM_SIGNAL_MSI = KVM_SIGNAL_MSI,
    CKVM_SET_GSI_ROUTING = KVM_SET_GSI_ROUTING,
    CKVM_IRQFD = KVM_IRQFD,
    CKVM_IOEVENTFD = KVM_IOEVENTFD,
    CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG,
    CKVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG,
    CKVM_GET_CLOCK = KVM_GET_CLOCK,
    CKVM_SET_CLOCK = KVM_SET_CLOCK,
    CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP,
    CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP,
    CKVM_GET_PIT2 = KVM_GET_PIT2,
    CKVM_SET_PIT2 = KVM_SET_PIT2,
    CKVM_ENABLE_CAP = KVM_ENABLE_CAP,
    // vCPU
    CKVM_RUN = KVM_RUN,
    CKVM_GET_REGS = KVM_GET_REGS,
    CKVM_SET_REGS = KVM_SET_REGS,
    CKVM_GET_SREGS = KVM_GET_SREGS,
    CKVM_SET_SREGS = KVM_SET_SREGS,
    CKVM_GET_FPU = KVM_GET_FPU,
    CKVM_SET_FPU = KVM_SET_FPU,
    CKVM_GET_MSRS = KVM_GET_MSRS,
    CKVM_SET_MSRS = KVM_SET_MSRS,
    CKVM_SET_CPUID2 = KVM_SET_CPUID2,
    CKVM_GET_CPUID2 = KVM_GET_CPUID2,
    CKVM_GET_LAPIC = KVM_GET_LAPIC,
    CKVM_SET_LAPIC = KVM_SET_LAPIC,
    CKVM_GET_XSAVE = KVM_GET_XSAVE,
    CKVM_SET_XSAVE = KVM_SET_XSAVE,
    CKVM_GET_XCRS = KVM_GET_XCRS,
    CKVM_SET_XCRS = KVM_SET_XCRS,
    CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS,
    CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS,
    CKVM_GET_MP_STATE = KVM_GET_MP_STATE,
    CKVM_SET_MP_STATE = KVM_SET_MP_STATE,
    CKVM_SET_SIGNAL_MASK = KVM_SET_SIGNAL_MASK,
    CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS,
    CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS,
    CKVM_INTERRUPT = KVM_INTERRUPT,
    CKVM_NMI = KVM_NMI,
};

// MARK: - Non-variadic ioctl wrappers
//
// They return the raw ioctl result; on -1 errno is set. No retry on EINTR here: for KVM_RUN an
// EINTR is a kick and must reach the caller, and the Swift layer decides retry policy per call.

int ckvm_ioctl(int fd, unsigned long request);
int ckvm_ioctl_arg(int fd, unsigned long request, unsigned long argument);
int ckvm_ioctl_ptr(int fd, unsigned long request, void *_Nullable pointer);
/// errno of the calling thread (Swift 6 cannot read glibc's errno macro reliably across modules).
int ckvm_errno(void);

// MARK: - Variable-length KVM structs
//
// kvm_cpuid2, kvm_msrs, kvm_msr_list, kvm_irq_routing and kvm_signal_mask end in flexible arrays
// Swift cannot allocate. These helpers size them; the caller frees with free().

struct kvm_cpuid2 *_Nullable ckvm_cpuid2_alloc(uint32_t entries);
struct kvm_cpuid_entry2 *_Nonnull ckvm_cpuid2_entry(struct kvm_cpuid2 *_Nonnull table, uint32_t index);
struct kvm_msrs *_Nullable ckvm_msrs_alloc(uint32_t entries);
struct kvm_msr_entry *_Nonnull ckvm_msrs_entry(struct kvm_msrs *_Nonnull msrs, uint32_t index);
struct kvm_msr_list *_Nullable ckvm_msr_list_alloc(uint32_t entries);
uint32_t ckvm_msr_list_index(const struct kvm_msr_list *_Nonnull list, uint32_t index);
struct kvm_irq_routing *_Nullable ckvm_irq_routing_alloc(uint32_t entries);
struct kvm_irq_routing_entry *_Nonnull ckvm_irq_routing_entry(struct kvm_irq_routing *_Nonnull routing, uint32_t index);
void ckvm_free(void *_Nullable pointer);

// MARK: - vCPU kick
//
// A vCPU thread registers its kvm_run mapping; a real-time signal delivered to that thread (by
// pthread_kill) sets kvm_run->immediate_exit, so KVM_RUN returns EINTR at once, whether the signal
// arrives before KVM_RUN is entered or while the guest runs. The handler is C so it stays
// async-signal-safe and never enters the Swift runtime. Installed without SA_RESTART.

/// The signal number used for kicks (SIGRTMIN + 1, leaving SIGRTMIN to others).
int ckvm_kick_signal(void);
/// Installs the process-wide handler once. Returns 0 or -errno.
int ckvm_kick_install(void);
/// Registers the calling thread's kvm_run (NULL to unregister).
void ckvm_kick_register(struct kvm_run *_Nullable run);
/// Sends the kick signal to a thread. Returns 0 or an errno value.
int ckvm_kick_thread(unsigned long thread);
/// Unblocks the kick signal on the calling thread (a vCPU thread must be able to receive it).
int ckvm_kick_unblock(void);

// MARK: - Threads (GNU extensions Swift's Glibc module does not expose)

/// Names the calling thread (at most 15 characters are kept).
void ckvm_thread_set_name(const char *_Nonnull name);
/// Joins a thread, giving up after `milliseconds`. Returns 0, ETIMEDOUT or another errno value.
int ckvm_thread_join(unsigned long thread, int milliseconds);

// MARK: - Files (snapshots)

/// Atomically swaps two paths (renameat2 RENAME_EXCHANGE): a new snapshot directory replaces
/// the old one with no moment where neither exists. Returns 0 or -errno.
int ckvm_rename_exchange(const char *_Nonnull from, const char *_Nonnull to);

/// One range of guest RAM: where it is mapped here, how long, where it goes in the memory file.
struct ckvm_memory_region {
    uint64_t host_address;
    uint64_t size;
    uint64_t file_offset;
};

/// Forks a child that writes the touched, non-zero pages of `regions` into `out_fd` (already sized)
/// — from the child's copy-on-write view of memory, so the parent's guest may run on meanwhile —
/// then fsyncs it and exits: status 0 on success, else an errno value. "Touched": present or
/// swapped in /proc/self/pagemap, or, when `backing_fd` >= 0 (RAM privately mapped from an earlier
/// snapshot), data in that file. The child runs only this C code and system calls. Returns the
/// child's pid, or -errno.
int ckvm_fork_memory_writer(const struct ckvm_memory_region *_Nonnull regions, int count, int backing_fd, int out_fd);

// MARK: - kvm_run helpers

static inline uint8_t *_Nonnull ckvm_run_io_data(struct kvm_run *_Nonnull run) {
    return (uint8_t *)run + run->io.data_offset;
}

// MARK: - Host CPU probes

typedef struct {
    uint32_t eax, ebx, ecx, edx;
} ckvm_cpuid_regs;

/// Executes CPUID on the host CPU.
ckvm_cpuid_regs ckvm_host_cpuid(uint32_t leaf, uint32_t subleaf);
/// Reads an MSR through /dev/cpu/<cpu>/msr. Returns 0 or -errno (ENOENT: no msr module;
/// EACCES/EPERM: not root; EIO: the MSR does not exist on this CPU).
int ckvm_host_read_msr(int cpu, uint32_t msr, uint64_t *_Nonnull value);

/// Reads the time-stamp counter (for benchmarks and the boot timer).
static inline uint64_t ckvm_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}


// MARK: - Event file descriptors, epoll, entropy (virtio I/O threads)
//
// eventfd/epoll/getrandom live in headers Swift's Glibc module does not expose reliably; these
// wrappers keep the I/O thread code free of variadic or macro-only APIs.

/// A non-blocking, close-on-exec eventfd. Returns the fd or -errno.
int ckvm_eventfd_create(void);
/// Adds 1 to an eventfd's counter. Returns 0 or -errno (EAGAIN when saturated counts as success).
int ckvm_eventfd_signal(int fd);
/// Reads and clears an eventfd's counter. Returns the count, 0 when it was already clear.
uint64_t ckvm_eventfd_drain(int fd);
/// An epoll instance (close-on-exec). Returns the fd or -errno.
int ckvm_epoll_create(void);
/// Watches `fd` for input; `token` comes back from ckvm_epoll_wait. Returns 0 or -errno.
int ckvm_epoll_add(int epoll_fd, int fd, uint64_t token);
/// Stops watching `fd`. Returns 0 or -errno.
int ckvm_epoll_del(int epoll_fd, int fd);
/// Waits for up to `capacity` ready tokens. Returns the count, or -errno (EINTR included).
int ckvm_epoll_wait(int epoll_fd, uint64_t *_Nonnull tokens, int capacity, int timeout_ms);
/// Fills `buffer` from the kernel's CSPRNG (getrandom). Returns bytes written or -errno.
long ckvm_getrandom(void *_Nonnull buffer, size_t length);

// MARK: - TAP devices (virtio-net backend; tap.c)

/// TUNSETOFFLOAD flags (linux/if_tun.h).
enum : unsigned {
    CKVM_TUN_F_CSUM = 0x01,
    CKVM_TUN_F_TSO4 = 0x02,
    CKVM_TUN_F_TSO6 = 0x04,
};
/// Opens /dev/net/tun as a TAP interface named `name` (empty: the kernel picks tapN) with
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte vnet header (TUNSETVNETHDRSZ), non-blocking and
/// close-on-exec. The interface's name is written to `actual_name` (16 bytes). Returns the fd or -errno.
int ckvm_tap_open(const char *_Nonnull name, char *_Nonnull actual_name);
/// Prepares an already-open TAP fd (from a privileged helper): checks it is a TAP with a vnet
/// header (TUNGETIFF), sets the 12-byte header, non-blocking and close-on-exec; writes its name.
/// Returns 0 or -errno (-EINVAL when it is not a TAP with IFF_VNET_HDR).
int ckvm_tap_adopt(int fd, char *_Nonnull actual_name);
/// TUNSETOFFLOAD. Returns 0 or -errno.
int ckvm_tap_set_offload(int fd, unsigned flags);

// MARK: - Bridges for virtual switches (bridge.c)

/// Makes interface `port` a port of bridge `bridge` (SIOCBRADDIF) and brings it up. Needs
/// CAP_NET_ADMIN. Returns 0 or -errno (-ENODEV when either interface is missing).
int ckvm_bridge_attach(const char *_Nonnull bridge, const char *_Nonnull port);
/// Attaches a two-instruction XDP program that drops every frame (generic/skb mode, through
/// netlink IFLA_XDP) to interface `ifindex`. On a bridge it stops the frames the bridge would pass
/// up to the host's own stack (and to packet captures on the bridge) while the bridge keeps
/// forwarding between its ports. Stays attached until the interface is deleted. Returns 0 or -errno.
int ckvm_xdp_drop_all(int ifindex);
/// Whether the calling thread has CAP_NET_ADMIN in its effective set (capget). 1, 0, or -errno.
int ckvm_has_net_admin(void);

// MARK: - Shared-memory access for virtqueues
//
// The guest writes rings concurrently with the device. Index loads need acquire semantics (what
// the index publishes is read after it), used-index stores need release semantics, and the
// event-index protocol needs a full fence between publishing and re-checking.

static inline uint16_t ckvm_load_acquire_u16(const void *_Nonnull p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline void ckvm_store_release_u16(void *_Nonnull p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}
static inline void ckvm_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void ckvm_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void ckvm_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/// Atomically ORs `bits` into the 64-bit word at `p` (accessed/dirty bits of a guest page-table entry).
static inline void ckvm_atomic_or_u64(void *_Nonnull p, uint64_t bits) {
    __atomic_fetch_or((uint64_t *)p, bits, __ATOMIC_SEQ_CST);
}

// MARK: - 16-byte compare-and-swap (emulation completion of cmpxchg16b)

/// `lock cmpxchg16b` on host memory `p` (16-byte aligned): if the 16 bytes equal
/// `expected[0..1]` (low, high) they become `desired_lo`/`desired_hi` and 1 is returned; otherwise
/// `expected` receives the current contents and 0 is returned. Atomic against every other CPU
/// (and so against the guest's other vCPUs).
static inline int ckvm_cmpxchg16b(void *_Nonnull p, uint64_t *_Nonnull expected, uint64_t desired_lo,
                                  uint64_t desired_hi) {
#if defined(__x86_64__)
    uint64_t lo = expected[0], hi = expected[1];
    unsigned char ok;
    __asm__ volatile("lock cmpxchg16b %1\n\tsete %0"
                     : "=q"(ok), "+m"(*(volatile unsigned __int128 *)p), "+a"(lo), "+d"(hi)
                     : "b"(desired_lo), "c"(desired_hi)
                     : "memory", "cc");
    expected[0] = lo;
    expected[1] = hi;
    return ok;
#else
    unsigned __int128 want = ((unsigned __int128)expected[1] << 64) | expected[0];
    unsigned __int128 desired = ((unsigned __int128)desired_hi << 64) | desired_lo;
    int ok = __atomic_compare_exchange_n((unsigned __int128 *)p, &want, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    expected[0] = (uint64_t)want;
    expected[1] = (uint64_t)(want >> 64);
    return ok;
#endif
}

#ifdef __cplusplus
}
#endif

#include "ckvm_storage.h"
#include "ckvm_migration.h"

#endif

