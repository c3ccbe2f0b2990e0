// Helpers for live migration (Sources/HyperCore/Migration).
#include "ckvm_migration.h"
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <errno.h>
#include <unistd.h>

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}
#endif

int ckvm_crc32c_hardware(void) {
#if defined(__x86_64__)
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    return 0;
#endif
}

uint32_t ckvm_crc32c(uint32_t crc, const void *p, size_t n) {
#if defined(__x86_64__)
    return crc32c_hw(crc, (const uint8_t *)p, n);
#else
    (void)p; (void)n;
    return crc;
#endif
}

long ckvm_writev(int fd, const void *const *bases, const size_t *lengths, int count) {
    struct iovec vec[1024];
    if (count > 1024) return -EINVAL;
    for (int i = 0; i < count; i++) {
        vec[i].iov_base = (void *)bases[i];
        vec[i].iov_len = lengths[i];
    }
    // sendmsg with MSG_NOSIGNAL: a peer that went away is an EPIPE error for the caller, never a
    // SIGPIPE that ends the process (a library must not kill its host). Pipes and files: writev.
    struct msghdr message = { .msg_iov = vec, .msg_iovlen = (size_t)count };
    ssize_t n = sendmsg(fd, &message, MSG_NOSIGNAL);
    if (n < 0 && errno == ENOTSOCK) n = writev(fd, vec, count);
    return n < 0 ? -errno : n;
}

#include <sys/prctl.h>
#include <signal.h>

int ckvm_set_parent_death_signal(int signal) {
    return prctl(PR_SET_PDEATHSIG, (unsigned long)signal, 0, 0, 0) == 0 ? 0 : -errno;
}

long ckvm_send_descriptor(int socket, int passed, const void *data, size_t length) {
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct iovec vector = { .iov_base = (void *)data, .iov_len = length };
    struct msghdr message = { .msg_iov = &vector, .msg_iovlen = 1,
                              .msg_control = control.space, .msg_controllen = sizeof control.space };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &passed, sizeof(int));
    ssize_t sent;
    do { sent = sendmsg(socket, &message, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    return sent < 0 ? -errno : sent;
}

long ckvm_receive_descriptor(int socket, int *passed, void *data, size_t capacity) {
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int) * 4)]; } control;
    struct iovec vector = { .iov_base = data, .iov_len = capacity };
    struct msghdr message = { .msg_iov = &vector, .msg_iovlen = 1,
                              .msg_control = control.space, .msg_controllen = sizeof control.space };
    *passed = -1;
    ssize_t received;
    do { received = recvmsg(socket, &message, MSG_CMSG_CLOEXEC); } while (received < 0 && errno == EINTR);
    if (received < 0) return -errno;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t index = 0; index < count; index++) {
            int fd;
            memcpy(&fd, CMSG_DATA(header) + index * sizeof(int), sizeof(int));
            if (*passed < 0) *passed = fd; else close(fd);
        }
    }
    return received;
}
