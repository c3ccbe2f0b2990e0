/*
 * A freestanding network endpoint over virtio-net (rt/virtio.c): answers ARP
 * and ICMP echo for its address, pings a peer, optionally sends UDP.
 *
 * Command line: ip=A.B.C.D|dhcp peer=A.B.C.D [mmio=1] [count=N] [udp=N]
 * [size=N] [sink=N] [batch=B] [answer=N] [interval=MS]
 *   ip=dhcp  get the address from a DHCP server first (DISCOVER, OFFER,
 *            REQUEST, ACK) and print `dhcp_ip=A.B.C.D` and `dhcp_server=…`;
 *            without peer=, the peer is the DHCP server
 *   count    pings to send to peer (default 3); each reply prints `reply seq=N`,
 *            then `pings_ok=N`
 *   interval milliseconds (about: TSC at ~2.5 GHz) between pings (default 0:
 *            the next ping goes out when the reply arrives)
 *   udp      then send N UDP datagrams (port 9, discard) and print `udp_sent=N`
 *            and `udp_cycles=T` (TSC cycles for the burst)
 *   size     UDP payload bytes of those datagrams (default 64, at most 1472:
 *            1472 makes 1500-byte IP packets, 1514-byte frames)
 *   sink     then count UDP datagrams to port 9 until N arrived or none came
 *            for 3 s; print `udp_received=K` and `udp_rx_cycles=T` (first to last)
 *   batch    for udp and sink: the driver's batched path, as a fast driver
 *            works: every tx buffer holds the same datagram, written once
 *            (no copy per frame), the device is notified once per B frames
 *            (and when the ring is full); received frames are read in place
 *            and their buffers given back with one notification per drain
 *   answer   then keep answering until N echo requests were answered
 *            (`answered=N`), so the host can ping the guest
 * Prints `mac=…`, `mtu=…` and `link=up|down` first; with the link down it
 * stops there. Ends with debug exit 0x42 (0x7F on a driver error).
 */
#include "rt.h"
#include "virtio.h"

#define EXIT_NET 0x42
#define TSC_PER_MS 2500000ul
#define ETH_ARP 0x0806
#define ETH_IP 0x0800

static struct vdev dev;
static struct vring rings[2];
static u8 rxbuf[VIRTIO_QSZ][VNET_BUF] __attribute__((aligned(4096)));
static u8 txbuf[VIRTIO_QSZ][VNET_BUF] __attribute__((aligned(4096)));
static struct vnet net;
static u8 frame[VNET_BUF];
static u8 out[VNET_BUF];
static u32 my_ip, peer_ip;
static u8 peer_mac[6];
static int peer_known;
static u16 ping_id = 0x4843, last_reply;
static u64 answered, merged;
static u64 sunk, sink_first, sink_last;

static int cmdline_ip(const char *cmdline, const char *key, u32 *ip)
{
	for (const char *w = cmdline; *w; w++) {
		if (w != cmdline && w[-1] != ' ')
			continue;
		const char *k = key, *p = w;
		while (*k && *p == *k) k++, p++;
		if (*k || *p++ != '=')
			continue;
		u32 v = 0;
		for (int part = 0; part < 4; part++) {
			u32 b = 0;
			int digits = 0;
			while (*p >= '0' && *p <= '9') b = b * 10 + (*p++ - '0'), digits++;
			if (!digits || b > 255 || (part < 3 && *p++ != '.'))
				return 0;
			v = v << 8 | b;
		}
		*ip = v;
		return 1;
	}
	return 0;
}

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { p[0] = v >> 24; p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }

static u16 checksum(const u8 *p, u32 len)
{
	u32 sum = 0;
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, net.mac, 6);
	put16(f + 12, type);
}

static void send(const u8 *f, u32 len)
{
	for (int tries = 0; !vnet_send(&net, f, len); tries++)
		if (tries > 1000000)
			virtio_fail("tx ring stuck");
}

static void arp(u16 op, const u8 *dst_mac, u32 dst_ip)
{
	static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	memset(out, 0, 60);
	eth_header(out, op == 1 ? broadcast : dst_mac, ETH_ARP);
	u8 *a = out + 14;
	put16(a, 1);
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, net.mac, 6);
	put32(a + 14, my_ip);
	if (op == 2) memcpy(a + 18, dst_mac, 6);
	put32(a + 24, dst_ip);
	send(out, 60);
}

/* Builds an IPv4 frame around the `payload` bytes already at out + 34; returns its length. */
static u32 ip_build(const u8 *dst_mac, u32 dst, u8 proto, u32 payload)
{
	eth_header(out, dst_mac, ETH_IP);
	u8 *ip = out + 14;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(20 + payload));
	put16(ip + 4, 0);
	put16(ip + 6, 0x4000);	/* DF */
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, my_ip);
	put32(ip + 16, dst);
	put16(ip + 10, checksum(ip, 20));
	u32 len = 34 + payload;
	if (len < 60) {
		memset(out + len, 0, 60 - len);
		len = 60;
	}
	return len;
}

static void ip_send(const u8 *dst_mac, u32 dst, u8 proto, u32 payload)
{
	send(out, ip_build(dst_mac, dst, proto, payload));
}

/* A UDP datagram to the peer's port 9 (discard) with `size` payload bytes, `seq` first; returns the frame length. */
static u32 udp_build(u64 size, u8 seq)
{
	u8 *u = out + 34;
	put16(u, 40000);
	put16(u + 2, 9);
	put16(u + 4, (u16)(8 + size));
	put16(u + 6, 0);	/* no UDP checksum (allowed on IPv4) */
	u[8] = seq;
	return ip_build(peer_mac, peer_ip, 17, (u32)(8 + size));
}

static void ping(u16 seq)
{
	u8 *icmp = out + 34;
	icmp[0] = 8;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, ping_id);
	put16(icmp + 6, seq);
	for (int i = 0; i < 32; i++) icmp[8 + i] = (u8)('a' + i % 26);
	put16(icmp + 2, checksum(icmp, 40));
	ip_send(peer_mac, peer_ip, 1, 40);
}

static int same(const void *a, const void *b, u32 n)
{
	const u8 *x = a, *y = b;
	for (u32 i = 0; i < n; i++)
		if (x[i] != y[i])
			return 0;
	return 1;
}

/* DHCP client state (ip=dhcp): the offer or acknowledgement seen last. */
static const u32 dhcp_xid = 0x48436e74;
static u32 dhcp_offered, dhcp_server;
static int dhcp_type;

/* A BOOTP reply for our transaction: remembers its type, address and server. */
static void dhcp_reply(const u8 *b, u32 len)
{
	if (len < 240 || b[0] != 2 || get32(b + 4) != dhcp_xid || !same(b + 28, net.mac, 6) || get32(b + 236) != 0x63825363)
		return;
	int type = 0;
	u32 server = 0;
	for (u32 i = 240; i < len && b[i] != 255;) {
		if (b[i] == 0) { i++; continue; }
		if (i + 2 > len || i + 2 + b[i + 1] > len)
			break;
		if (b[i] == 53 && b[i + 1] >= 1) type = b[i + 2];
		if (b[i] == 54 && b[i + 1] >= 4) server = get32(b + i + 2);
		i += 2 + b[i + 1];
	}
	if (type != 2 && type != 5 && type != 6)
		return;
	dhcp_type = type;
	dhcp_offered = get32(b + 16);
	if (server) dhcp_server = server;
}

/* Broadcasts a DHCPDISCOVER (type 1) or DHCPREQUEST (type 3) for the offered address. */
static void dhcp_send(int type)
{
	static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	u8 *u = out + 34, *b = u + 8;
	memset(u, 0, 8 + 300);
	b[0] = 1; b[1] = 1; b[2] = 6;
	put32(b + 4, dhcp_xid);
	put16(b + 10, 0x8000);	/* broadcast the reply: we have no address yet */
	memcpy(b + 28, net.mac, 6);
	put32(b + 236, 0x63825363);
	u8 *o = b + 240;
	*o++ = 53; *o++ = 1; *o++ = (u8)type;
	if (type == 3) {
		*o++ = 50; *o++ = 4; put32(o, dhcp_offered); o += 4;
		*o++ = 54; *o++ = 4; put32(o, dhcp_server); o += 4;
	}
	*o++ = 55; *o++ = 2; *o++ = 1; *o++ = 3;
	*o = 255;
	put16(u, 68);
	put16(u + 2, 67);
	put16(u + 4, 8 + 300);
	u32 saved = my_ip;
	my_ip = 0;
	ip_send(broadcast, 0xffffffffu, 17, 8 + 300);
	my_ip = saved;
}

/* Handles one received frame. */
static void handle(const u8 *f, int len)
{
	if (len < 14)
		return;
	u16 type = get16(f + 12);
	if (type == ETH_ARP && len >= 42) {
		const u8 *a = f + 14;
		u16 op = get16(a + 6);
		u32 sender = get32(a + 14), target = get32(a + 24);
		if (sender == peer_ip) {
			memcpy(peer_mac, a + 8, 6);
			peer_known = 1;
		}
		if (op == 1 && target == my_ip)
			arp(2, a + 8, sender);
		return;
	}
	if (type != ETH_IP || len < 34)
		return;
	const u8 *ip = f + 14;
	u32 ihl = (ip[0] & 15) * 4;
	u32 total = get16(ip + 2);
	if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl + 8 || 14 + total > (u32)len)
		return;
	if (ip[9] == 17 && get16(ip + ihl + 2) == 9 && get32(ip + 16) == my_ip) {
		u64 now = rdtsc();
		if (!sunk++) sink_first = now;
		sink_last = now;
		return;
	}
	if (ip[9] == 17 && get16(ip + ihl + 2) == 68) {
		dhcp_reply(ip + ihl + 8, total - ihl - 8);
		return;
	}
	if (get32(ip + 16) != my_ip)
		return;
	if (ip[9] != 1)
		return;
	const u8 *icmp = ip + ihl;
	u32 icmp_len = total - ihl;
	if (checksum(icmp, icmp_len) != 0)
		return;
	if (icmp[0] == 8 && icmp_len <= VNET_BUF - 64) {
		/* Echo request: answer to the sender's MAC. */
		memcpy(out + 34, icmp, icmp_len);
		out[34] = 0;
		put16(out + 36, 0);
		put16(out + 36, checksum(out + 34, icmp_len));
		ip_send(f + 6, get32(ip + 12), 1, icmp_len);
		answered++;
	} else if (icmp[0] == 0 && get16(icmp + 4) == ping_id && get32(ip + 12) == peer_ip) {
		last_reply = get16(icmp + 6);
		printf("reply seq=%u\n", last_reply);
	}
}

/* Receives and handles frames for about `ms` milliseconds, or until `until` returns true. */
static void serve(u64 ms, int (*until)(void))
{
	u64 start = rdtsc();
	while (rdtsc() - start < ms * TSC_PER_MS) {
		u16 nb;
		int len = vnet_recv(&net, frame, sizeof frame, &nb);
		if (len >= 0) {
			if (nb != 1) merged++;
			handle(frame, len);
		}
		if (until && until())
			return;
	}
}

static u16 waiting_seq;
static int got_reply(void) { return last_reply == waiting_seq; }
static int peer_resolved(void) { return peer_known; }
static u64 answer_target;
static int answered_enough(void) { return answered >= answer_target; }
static int dhcp_answered(void) { return dhcp_type != 0; }

/* ip=dhcp: DISCOVER → OFFER, REQUEST → ACK; sets my_ip (and peer_ip if not given). */
static void dhcp(int peer_given)
{
	for (int tries = 0; tries < 10 && dhcp_type != 2; tries++) {
		dhcp_type = 0;
		dhcp_send(1);
		serve(2000, dhcp_answered);
	}
	if (dhcp_type != 2)
		virtio_fail("no DHCP offer");
	for (int tries = 0; tries < 10 && dhcp_type != 5; tries++) {
		dhcp_type = 0;
		dhcp_send(3);
		serve(2000, dhcp_answered);
		if (dhcp_type == 6)
			virtio_fail("DHCP server said NAK");
	}
	if (dhcp_type != 5)
		virtio_fail("no DHCP acknowledgement");
	my_ip = dhcp_offered;
	if (!peer_given)
		peer_ip = dhcp_server;
	printf("dhcp_ip=%u.%u.%u.%u\n", my_ip >> 24, (my_ip >> 16) & 255, (my_ip >> 8) & 255, my_ip & 255);
	printf("dhcp_server=%u.%u.%u.%u\n", dhcp_server >> 24, (dhcp_server >> 16) & 255, (dhcp_server >> 8) & 255, dhcp_server & 255);
}

void guest_main(struct hvm_start_info *si)
{
	uart_init();
	const char *cmdline = pvh_cmdline(si);
	u64 use_mmio = 0, count = 3, udp = 0, interval = 0, size = 64, sink = 0, batch = 0;
	cmdline_uint(cmdline, "size", &size);
	cmdline_uint(cmdline, "sink", &sink);
	cmdline_uint(cmdline, "batch", &batch);
	if (size < 1) size = 1;
	if (size > 1472) size = 1472;
	cmdline_uint(cmdline, "mmio", &use_mmio);
	cmdline_uint(cmdline, "count", &count);
	cmdline_uint(cmdline, "udp", &udp);
	cmdline_uint(cmdline, "answer", &answer_target);
	cmdline_uint(cmdline, "interval", &interval);
	int use_dhcp = 0;
	for (const char *w = cmdline; *w; w++)
		if ((w == cmdline || w[-1] == ' ') && same(w, "ip=dhcp", 7) && (w[7] == ' ' || w[7] == 0))
			use_dhcp = 1;
	int peer_given = cmdline_ip(cmdline, "peer", &peer_ip);
	if ((!use_dhcp && !cmdline_ip(cmdline, "ip", &my_ip)) || (!use_dhcp && !peer_given))
		virtio_fail("ip=A.B.C.D (or ip=dhcp) and peer=A.B.C.D are needed");
	int found = use_mmio ? virtio_find_mmio(&dev, cmdline, 1) : virtio_find_pci(&dev, 1, 0x6);
	if (!found)
		virtio_fail("no virtio-net device");
	vnet_init(&net, &dev, VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU | VIRTIO_NET_F_MRG_RXBUF,
		  rings, rxbuf, txbuf);
	printf("mac=%x:%x:%x:%x:%x:%x\n", net.mac[0], net.mac[1], net.mac[2], net.mac[3], net.mac[4], net.mac[5]);
	printf("mtu=%u\n", net.mtu);
	int up = net.status & VIRTIO_NET_S_LINK_UP;
	printf("link=%s\n", up ? "up" : "down");
	if (!up)
		debug_exit(EXIT_NET);
	if (use_dhcp)
		dhcp(peer_given);

	u64 ok = 0;
	for (int tries = 0; tries < 10 && !peer_known; tries++) {
		arp(1, NULL, peer_ip);
		serve(1000, peer_resolved);
	}
	if (!peer_known)
		printf("error=peer did not answer ARP\n");
	for (u64 seq = 1; peer_known && seq <= count; seq++) {
		waiting_seq = (u16)seq;
		u64 sent = rdtsc();
		ping((u16)seq);
		serve(2000, got_reply);
		if (got_reply()) {
			ok++;
			u64 rtt_us = (rdtsc() - sent) / (TSC_PER_MS / 1000);
			(void)rtt_us;
		}
		if (interval)
			serve(interval, NULL);
	}
	printf("pings_ok=%lu\n", ok);
	if (udp && peer_known && batch) {
		u32 len = udp_build(size, 0);
		vnet_fill_tx(&net, out, len);
		u64 sent = 0, start = rdtsc();
		for (u64 tries = 0; sent < udp; tries++) {
			if (vnet_send_filled(&net, len, (sent + 1) % batch == 0 || sent + 1 == udp)) {
				sent++;
				tries = 0;
			} else if (tries > 100000000) {
				virtio_fail("tx ring stuck");
			}
		}
		printf("udp_sent=%lu\n", sent);
		printf("udp_cycles=%lu\n", rdtsc() - start);
	} else if (udp && peer_known) {
		u64 sent = 0, start = rdtsc();
		for (u64 i = 0; i < udp; i++) {
			send(out, udp_build(size, (u8)i));
			sent++;
			u16 nb;
			int len = vnet_recv(&net, frame, sizeof frame, &nb);
			if (len >= 0) handle(frame, len);
		}
		printf("udp_sent=%lu\n", sent);
		printf("udp_cycles=%lu\n", rdtsc() - start);
	}
	if (sink) {
		printf("sink_ready\n");
		u64 idle_since = rdtsc(), seen = 0;
		while (sunk < sink && rdtsc() - idle_since < 3000 * TSC_PER_MS) {
			if (batch) {
				const u8 *f;
				u32 len;
				u16 id;
				int any = 0;
				while ((f = vnet_rx_next(&net, &len, &id))) {
					handle(f, (int)len);
					vnet_rx_release(&net, id);
					any = 1;
				}
				if (any)
					virtio_kick(&net.rx);
			} else {
				u16 nb;
				int len = vnet_recv(&net, frame, sizeof frame, &nb);
				if (len >= 0) handle(frame, len);
			}
			if (sunk != seen) {
				seen = sunk;
				idle_since = rdtsc();
			}
		}
		printf("udp_received=%lu\n", sunk);
		printf("udp_rx_cycles=%lu\n", sunk > 1 ? sink_last - sink_first : 0);
	}
	if (answer_target) {
		serve(60000, answered_enough);
		printf("answered=%lu\n", answered);
	}
	if (merged)
		printf("merged_frames=%lu\n", merged);
	debug_exit(EXIT_NET);
}
