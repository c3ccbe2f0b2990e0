#include "CKVM.h"

#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/syscall.h>

// MARK: - ioctl

int ckvm_ioctl(int fd, unsigned long request) { return ioctl(fd, request, 0); }
int ckvm_ioctl_arg(int fd, unsigned long request, unsigned long argument) { return ioctl(fd, request, argument); }
int ckvm_ioctl_ptr(int fd, unsigned long request, void *pointer) { return ioctl(fd, request, pointer); }
int ckvm_errno(void) { return errno; }

// MARK: - Variable-length structs

struct kvm_cpuid2 *ckvm_cpuid2_alloc(uint32_t entries) {
    struct kvm_cpuid2 *table = calloc(1, sizeof(*table) + entries * sizeof(struct kvm_cpuid_entry2));
    if (table) table->nent = entries;
    return table;
}

struct kvm_cpuid_entry2 *ckvm_cpuid2_entry(struct kvm_cpuid2 *table, uint32_t index) { return &table->entries[index]; }

struct kvm_msrs *ckvm_msrs_alloc(uint32_t entries) {
    struct kvm_msrs *msrs = calloc(1, sizeof(*msrs) + entries * sizeof(struct kvm_msr_entry));
    if (msrs) msrs->nmsrs = entries;
    return msrs;
}

struct kvm_msr_entry *ckvm_msrs_entry(struct kvm_msrs *msrs, uint32_t index) { return &msrs->entries[index]; }

struct kvm_msr_list *ckvm_msr_list_alloc(uint32_t entries) {
    struct kvm_msr_list *list = calloc(1, sizeof(*list) + entries * sizeof(uint32_t));
    if (list) list->nmsrs = entries;
    return list;
}

uint32_t ckvm_msr_list_index(const struct kvm_msr_list *list, uint32_t index) { return list->indices[index]; }

struct kvm_irq_routing *ckvm_irq_routing_alloc(uint32_t entries) {
    struct kvm_irq_routing *routing = calloc(1, sizeof(*routing) + entries * sizeof(struct kvm_irq_routing_entry));
    if (routing) routing->nr = entries;
    return routing;
}

struct kvm_irq_routing_entry *ckvm_irq_routing_entry(struct kvm_irq_routing *routing, uint32_t index) {
    return &routing->entries[index];
}

void ckvm_free(void *pointer) { free(pointer); }

// MARK: - Kick

// Each vCPU thread stores its own kvm_run here; the handler runs on the signalled thread, so it
// reaches exactly that vCPU's mapping.
static __thread struct kvm_run *volatile kick_run;

static void kick_handler(int signal) {
    (void)signal;
    struct kvm_run *run = kick_run;
    if (run) {
        run->immediate_exit = 1;
        atomic_signal_fence(memory_order_seq_cst);
    }
}

int ckvm_kick_signal(void) { return SIGRTMIN + 1; }

static int kick_install_result;

static void kick_install_once(void) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    kick_install_result = sigaction(ckvm_kick_signal(), &action, NULL) == 0 ? 0 : -errno;
}

int ckvm_kick_install(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, kick_install_once);
    return kick_install_result;
}

void ckvm_kick_register(struct kvm_run *run) { kick_run = run; }

int ckvm_kick_thread(unsigned long thread) { return pthread_kill((pthread_t)thread, ckvm_kick_signal()); }

int ckvm_kick_unblock(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, ckvm_kick_signal());
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

// MARK: - Threads

void ckvm_thread_set_name(const char *name) {
    char truncated[16];
    snprintf(truncated, sizeof(truncated), "%s", name);
    pthread_setname_np(pthread_self(), truncated);
}

int ckvm_thread_join(unsigned long thread, int milliseconds) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += milliseconds / 1000;
    deadline.tv_nsec += (long)(milliseconds % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    return pthread_timedjoin_np((pthread_t)thread, NULL, &deadline);
}

// MARK: - Host probes

ckvm_cpuid_regs ckvm_host_cpuid(uint32_t leaf, uint32_t subleaf) {
    ckvm_cpuid_regs regs = {0, 0, 0, 0};
    __cpuid_count(leaf, subleaf, regs.eax, regs.ebx, regs.ecx, regs.edx);
    return regs;
}

int ckvm_host_read_msr(int cpu, uint32_t msr, uint64_t *value) {
    char path[64];
    snprintf(path, sizeof(path), "/dev/cpu/%d/msr", cpu);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    ssize_t n = pread(fd, value, sizeof(*value), (off_t)msr);
    int saved = errno;
    close(fd);
    if (n != (ssize_t)sizeof(*value)) return n < 0 ? -saved : -EIO;
    return 0;
}

// MARK: - Event file descriptors, epoll, entropy

int ckvm_eventfd_create(void) {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ckvm_eventfd_signal(int fd) {
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(fd, &one, sizeof(one));
        if (n == (ssize_t)sizeof(one)) return 0;
        if (n < 0 && errno == EINTR) continue;
        // EAGAIN: the counter is at its maximum, so the reader is already going to wake.
        return (n < 0 && errno != EAGAIN) ? -errno : 0;
    }
}

uint64_t ckvm_eventfd_drain(int fd) {
    uint64_t value = 0;
    for (;;) {
        ssize_t n = read(fd, &value, sizeof(value));
        if (n == (ssize_t)sizeof(value)) return value;
        if (n < 0 && errno == EINTR) continue;
        return 0;
    }
}

int ckvm_epoll_create(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ckvm_epoll_add(int epoll_fd, int fd, uint64_t token) {
    struct epoll_event event;
    memset(&event, 0, sizeof(event));
    event.events = EPOLLIN;
    event.data.u64 = token;
    return epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) == 0 ? 0 : -errno;
}

int ckvm_epoll_del(int epoll_fd, int fd) {
    return epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL) == 0 ? 0 : -errno;
}

int ckvm_epoll_wait(int epoll_fd, uint64_t *tokens, int capacity, int timeout_ms) {
    struct epoll_event events[16];
    if (capacity > 16) capacity = 16;
    int n = epoll_wait(epoll_fd, events, capacity, timeout_ms);
    if (n < 0) return -errno;
    for (int i = 0; i < n; i++) tokens[i] = events[i].data.u64;
    return n;
}

long ckvm_getrandom(void *buffer, size_t length) {
    for (;;) {
        ssize_t n = getrandom(buffer, length, 0);
        if (n >= 0) return (long)n;
        if (errno != EINTR) return -errno;
    }
}

int ckvm_rename_exchange(const char *from, const char *to) {
    long result = syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, 2 /* RENAME_EXCHANGE */);
    return result < 0 ? -errno : 0;
}

/* ---- Copy-on-write memory writer (snapshots taken while the guest runs on) ---- */

static int cow_write_all(int fd, const uint8_t *data, size_t count, off_t offset) {
    while (count > 0) {
        ssize_t n = pwrite(fd, data, count, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        data += n;
        count -= (size_t)n;
        offset += n;
    }
    return 0;
}

static int cow_page_is_zero(const uint8_t *page) {
    const uint64_t *words = (const uint64_t *)page;
    for (int i = 0; i < 512; i++)
        if (words[i]) return 0;
    return 1;
}

/* Whether `backing` has data at `offset` (one SEEK_DATA per call; fine for the child). */
static int cow_backing_has_data(int backing, off_t offset, off_t *data_start, off_t *data_end) {
    if (offset >= *data_start && offset < *data_end) return 1;
    if (offset < *data_start) return 0;
    off_t data = lseek(backing, offset, 3 /* SEEK_DATA */);
    if (data < 0) { *data_start = *data_end = (off_t)1 << 62; return 0; }
    off_t hole = lseek(backing, data, 4 /* SEEK_HOLE */);
    *data_start = data;
    *data_end = hole < 0 ? data : hole;
    return offset >= *data_start && offset < *data_end;
}

static int cow_write_region(int pagemap, int backing, int out, const struct ckvm_memory_region *r) {
    static uint64_t entries[4096];
    const uint64_t page_size = 4096, pages = r->size / page_size;
    off_t data_start = 0, data_end = 0;
    uint64_t run_start = 0, run_count = 0;
    for (uint64_t page = 0; page < pages;) {
        uint64_t batch = pages - page < 4096 ? pages - page : 4096;
        int known = 0;
        if (pagemap >= 0) {
            ssize_t want = (ssize_t)(batch * 8);
            known = pread(pagemap, entries, (size_t)want, (off_t)((r->host_address / page_size + page) * 8)) == want;
        }
        for (uint64_t i = 0; i < batch; i++) {
            uint64_t index = page + i;
            int candidate = !known || (entries[i] & (3ull << 62));
            if (!candidate && backing >= 0)
                candidate = cow_backing_has_data(backing, (off_t)(r->file_offset + index * page_size), &data_start, &data_end);
            const uint8_t *address = (const uint8_t *)(uintptr_t)(r->host_address + index * page_size);
            if (candidate && !cow_page_is_zero(address)) {
                if (run_count && run_start + run_count == index && run_count < 2048) { run_count++; continue; }
                if (run_count) {
                    int e = cow_write_all(out, (const uint8_t *)(uintptr_t)(r->host_address + run_start * page_size),
                                          run_count * page_size, (off_t)(r->file_offset + run_start * page_size));
                    if (e) return e;
                }
                run_start = index;
                run_count = 1;
            }
        }
        page += batch;
    }
    if (run_count)
        return cow_write_all(out, (const uint8_t *)(uintptr_t)(r->host_address + run_start * page_size),
                             run_count * page_size, (off_t)(r->file_offset + run_start * page_size));
    return 0;
}

int ckvm_fork_memory_writer(const struct ckvm_memory_region *regions, int count, int backing_fd, int out_fd) {
    pid_t pid = fork();
    if (pid < 0) return -errno;
    if (pid > 0) return pid;
    /* The child: only this code and system calls from here to _exit. */
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    int status = 0;
    for (int i = 0; i < count && !status; i++)
        status = cow_write_region(pagemap, backing_fd, out_fd, &regions[i]);
    if (!status && fsync(out_fd) != 0) status = errno;
    _exit(status > 255 ? 255 : status);
}
