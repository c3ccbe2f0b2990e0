#ifndef CKVM_MIGRATION_H
#define CKVM_MIGRATION_H
#include <stddef.h>
#include <stdint.h>

// MARK: - Live migration (migration.c)

/// 1 when this CPU has SSE4.2's crc32 instruction (ckvm_crc32c may be used), else 0.
int ckvm_crc32c_hardware(void);
/// CRC-32C of `n` bytes continuing from `crc` (same convention as the Swift CRC32C), with the
/// SSE4.2 instruction: call only when ckvm_crc32c_hardware() is 1.
uint32_t ckvm_crc32c(uint32_t crc, const void *_Nonnull p, size_t n);
/// writev over `count` (≤ 1024) buffers — on a socket sendmsg with MSG_NOSIGNAL, so a closed peer
/// is -EPIPE, never SIGPIPE. Returns bytes written or -errno.
long ckvm_writev(int fd, const void *_Nonnull const *_Nonnull bases, const size_t *_Nonnull lengths, int count);
/// prctl(PR_SET_PDEATHSIG): `signal` (0: none) is sent to this process when its parent ends.
/// Returns 0 or -errno.
int ckvm_set_parent_death_signal(int signal);
/// Sends `length` bytes of `data` (at least 1) and the descriptor `passed` (SCM_RIGHTS) in one
/// message on the Unix socket `socket`, MSG_NOSIGNAL. Returns bytes sent or -errno.
long ckvm_send_descriptor(int socket, int passed, const void *_Nonnull data, size_t length);
/// Receives one message of at most `capacity` bytes from the Unix socket `socket`, with at most
/// one descriptor (close-on-exec), into `*passed` (-1 when none came; any extra is closed).
/// Returns bytes received (0 at end of stream) or -errno.
long ckvm_receive_descriptor(int socket, int *_Nonnull passed, void *_Nonnull data, size_t capacity);

#endif
