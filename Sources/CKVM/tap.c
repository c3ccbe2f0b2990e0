// TAP devices for virtio-net: the ioctls Swift cannot call (variadic ioctl, macro-only numbers).
#include "CKVM.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/if_tun.h>

static int ckvm_tap_prepare(int fd, char *actual_name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -errno;
    if ((ifr.ifr_flags & (IFF_TAP | IFF_TUN)) != IFF_TAP || !(ifr.ifr_flags & IFF_VNET_HDR) || (ifr.ifr_flags & IFF_NO_PI) == 0)
        return -EINVAL;
    int size = 12;  // struct virtio_net_hdr_v1
    if (ioctl(fd, TUNSETVNETHDRSZ, &size) < 0) return -errno;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return -errno;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) return -errno;
    // No offloads until the guest acknowledges them.
    if (ioctl(fd, TUNSETOFFLOAD, 0UL) < 0) return -errno;
    memcpy(actual_name, ifr.ifr_name, IFNAMSIZ);
    actual_name[IFNAMSIZ - 1] = 0;
    return 0;
}

int ckvm_tap_open(const char *name, char *actual_name) {
    if (strlen(name) >= IFNAMSIZ) return -ENAMETOOLONG;
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    int result = ckvm_tap_prepare(fd, actual_name);
    if (result < 0) {
        close(fd);
        return result;
    }
    return fd;
}

int ckvm_tap_adopt(int fd, char *actual_name) { return ckvm_tap_prepare(fd, actual_name); }

int ckvm_tap_set_offload(int fd, unsigned flags) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags) < 0 ? -errno : 0;
}
