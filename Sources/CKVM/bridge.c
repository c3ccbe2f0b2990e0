// Bridges for virtual switches: the few privileged operations done with ioctls and netlink
// rather than by running `ip` (attaching a VM's TAP is on every VM start; the XDP program has no
// `ip` form without an object file).
#include "CKVM.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/bpf.h>
#include <linux/capability.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>

int ckvm_bridge_attach(const char *bridge, const char *port) {
    if (strlen(bridge) >= IFNAMSIZ || strlen(port) >= IFNAMSIZ) return -ENAMETOOLONG;
    int index = (int)if_nametoindex(port);
    if (index == 0) return -errno;
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, bridge, IFNAMSIZ - 1);
    ifr.ifr_ifindex = index;
    int result = 0;
    if (ioctl(sock, SIOCBRADDIF, &ifr) < 0) {
        result = -errno;
    } else {
        memset(&ifr, 0, sizeof(ifr));
        strncpy(ifr.ifr_name, port, IFNAMSIZ - 1);
        if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) {
            result = -errno;
        } else {
            ifr.ifr_flags |= IFF_UP;
            if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0) result = -errno;
        }
    }
    close(sock);
    return result;
}

int ckvm_xdp_drop_all(int ifindex) {
    // r0 = XDP_DROP; exit
    struct bpf_insn insns[2];
    memset(insns, 0, sizeof(insns));
    insns[0].code = BPF_ALU64 | BPF_MOV | BPF_K;
    insns[0].dst_reg = BPF_REG_0;
    insns[0].imm = XDP_DROP;
    insns[1].code = BPF_JMP | BPF_EXIT;
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_XDP;
    attr.insns = (unsigned long)insns;
    attr.insn_cnt = 2;
    attr.license = (unsigned long)"GPL";
    int prog = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (prog < 0) return -errno;
    int sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (sock < 0) {
        int error = errno;
        close(prog);
        return -error;
    }
    struct {
        struct nlmsghdr header;
        struct ifinfomsg info;
        char attributes[64];
    } request;
    memset(&request, 0, sizeof(request));
    request.header.nlmsg_type = RTM_SETLINK;
    request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    request.header.nlmsg_seq = 1;
    request.info.ifi_family = AF_UNSPEC;
    request.info.ifi_index = ifindex;
    struct rtattr *xdp = (struct rtattr *)request.attributes;
    xdp->rta_type = IFLA_XDP | NLA_F_NESTED;
    struct rtattr *fd = (struct rtattr *)((char *)xdp + RTA_LENGTH(0));
    fd->rta_type = IFLA_XDP_FD;
    fd->rta_len = RTA_LENGTH(sizeof(int));
    memcpy(RTA_DATA(fd), &prog, sizeof(int));
    struct rtattr *flags = (struct rtattr *)((char *)fd + RTA_ALIGN(fd->rta_len));
    unsigned mode = XDP_FLAGS_SKB_MODE;
    flags->rta_type = IFLA_XDP_FLAGS;
    flags->rta_len = RTA_LENGTH(sizeof(unsigned));
    memcpy(RTA_DATA(flags), &mode, sizeof(unsigned));
    xdp->rta_len = RTA_LENGTH(0) + RTA_ALIGN(fd->rta_len) + RTA_ALIGN(flags->rta_len);
    request.header.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)) + RTA_ALIGN(xdp->rta_len);
    int result = 0;
    if (send(sock, &request, request.header.nlmsg_len, 0) < 0) {
        result = -errno;
    } else {
        char reply[4096];
        ssize_t count = recv(sock, reply, sizeof(reply), 0);
        struct nlmsghdr *header = (struct nlmsghdr *)reply;
        if (count < 0) result = -errno;
        else if (count < (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr)) || header->nlmsg_type != NLMSG_ERROR) result = -EPROTO;
        else result = ((struct nlmsgerr *)NLMSG_DATA(header))->error;
    }
    close(sock);
    close(prog);  // the attachment holds its own reference
    return result;
}

int ckvm_has_net_admin(void) {
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &header, data) < 0) return -errno;
    return (data[CAP_NET_ADMIN / 32].effective >> (CAP_NET_ADMIN % 32)) & 1;
}
