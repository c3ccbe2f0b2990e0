/*
 * A guest that keeps state in every part of the machine, for save/restore
 * tests: saved mid-run and restored in a new process, it must carry on with
 * the next step, lose and repeat none, and end with the result an
 * uninterrupted run prints. Any state the VMM drops shows up as an error.
 *
 * Each step (paced by the LAPIC periodic timer, `hlt` between ticks):
 *  - RAM: fills page k of the region at 16 MiB with a pattern of k (every
 *    qword), then re-checks the first, middle and last qword of pages 1..k-1;
 *  - UART: enables COM1's THR-empty interrupt (IOAPIC pin 4) and waits for the
 *    ISR to count it and disable it again: one interrupt per step;
 *  - virtio-blk (blk=1): writes sector k with a pattern of k and reads back
 *    sector k-1, on one virtqueue set up once (polled);
 *  - virtio-console (con=1): writes `con step=k` to port 0 (hvc0);
 *  - SMP (cpus=N): every AP counts its own LAPIC timer wake-ups, and each
 *    step checks that every AP's count moved since the step before.
 * At the end every page, sector and touched page is checked in full.
 *
 * Command line (all optional): steps=N (40), ticks=T (5 timer ticks a step,
 * about 100 Hz), blk=1, con=1, mmio=1 (virtio-mmio through
 * virtio_mmio.device=, else virtio-pci), cpus=N (1), touch=MIB (writes one
 * qword in every 4 KiB page of MIB MiB at 64 MiB once at start, so that a
 * snapshot carries that much non-zero RAM), dense=MIB (fills every page of MIB
 * MiB at 32 MiB whole with one value per page at start, with `rep stosq`, so
 * that a migration has that much memory no encoding shrinks), dirty=N (writes N pages a timer tick
 * across dirtymb=MIB MiB at 128 MiB, default 64: each page's first qword is
 * checked to hold what the guest last wrote there before the new value goes
 * in, so a page a migration lost or sent stale is caught; at the end every
 * page of the region is checked), uarthold=PCT (the UART handler spins PCT
 * percent of a timer tick, interrupts off, before it reads IIR: a save or a
 * migration then usually lands while the interrupt is in service and its
 * line still high, where a restore that raises the line again would deliver
 * it twice).
 *
 * Output (COM1): `stateful steps=N cpus=N blk=B con=C`, `touch=MIB` (with
 * touch), then `step=k` per step; at the end `pages_ok=N`, `disk_ok=N`
 * (blk), `touched_ok=PAGES` (touch), `dense_ok=PAGES` (dense), `dirty_ok=WRITES` (dirty), `uart_irqs=N`, `aps_ok=N-1` (cpus>1),
 * `result=0x<hash of steps, page and sector contents>`; timing-dependent
 * lines start with `info `. Debug exit 0x41, or `error=…` and 0x7F.
 */
#include "rt.h"
#include "smp_boot.h"
#include "virtio.h"

#define EXIT_STATEFUL	0x41

#define LAPIC		0xfee00000ul
#define LAPIC_SVR	0x0f0
#define LAPIC_EOI	0x0b0
#define LAPIC_LVT_TIMER	0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV	0x3e0
#define LVT_PERIODIC	(1u << 17)
#define IOAPIC		0xfec00000ul

/*
 * KVM's (and so QEMU's and HyperCore's) in-kernel LAPIC counts at 1 GHz:
 * divide by 16 and 625 000 counts is 10 ms. Only roughly right is needed.
 */
#define TIMER_DIV16	0x3
#define TIMER_COUNT	625000

#define VEC_TIMER	0x30
#define VEC_AP_TIMER	0x31
#define VEC_UART	0x34
#define VEC_SPURIOUS	0xff

#define PAGES_BASE	(16ul << 20)	/* page k (1..steps) of the marked region */
#define DENSE_BASE	(32ul << 20)	/* up to 32 MiB, below TOUCH_BASE */
#define TOUCH_BASE	(64ul << 20)
#define DIRTY_BASE	(128ul << 20)
#define MAX_STEPS	4096		/* the marked region ends below TOUCH_BASE */
#define MAX_CPUS	16

#define UART_IER	1
#define UART_IIR	2
#define UART_MCR	4
#define IER_THRI	0x02

#define BLK_IN		0
#define BLK_OUT		1

#define SEED_PAGE	0x5354415445465531ul
#define SEED_SECTOR	0x5354415445445331ul
#define SEED_TOUCH	0x5354415445545531ul
#define SEED_DIRTY	0x5354415445445931ul
#define SEED_DENSE	0x5354415445444e31ul

#define cli() __asm__ volatile("cli" ::: "memory")
/* Sleeps until an interrupt has been handled; interrupts stay off otherwise. */
#define sleep() __asm__ volatile("sti; hlt; cli" ::: "memory")

#define fail virtio_fail

static volatile u64 ticks, uart_irqs, uart_other;
static u64 tsc_first_tick, tsc_last_tick, uart_hold_percent;

/* APs: slot s (0..cpus-2) counts its own timer wake-ups in ap_count[s]. */
volatile u32 ap_next_slot, ap_online;
static volatile u64 ap_count[MAX_CPUS];
u8 ap_stacks[MAX_CPUS][4096] __attribute__((aligned(16)));
extern const char stateful_ap[];

static char cmdline[1024];	/* copied: the AP trampoline may overwrite low memory */

static u64 pattern(u64 seed, u64 k, u64 i)
{
	return seed ^ (k * 0x9e3779b97f4a7c15ul) ^ (i * 0xbf58476d1ce4e5b9ul);
}

static u64 mix(u64 h, u64 v)	/* FNV-1a over qwords */
{
	return (h ^ v) * 0x100000001b3ul;
}

static volatile u64 *page(u64 k) { return (volatile u64 *)(PAGES_BASE + k * 4096); }

/* ---- interrupts ---- */

static void eoi(void) { mmio_write32(LAPIC + LAPIC_EOI, 0); }

static void on_timer(struct trap_frame *f)
{
	(void)f;
	u64 now = rdtsc();
	if (!ticks)
		tsc_first_tick = now;
	tsc_last_tick = now;
	ticks++;
	eoi();
}

static void on_ap_timer(struct trap_frame *f)
{
	(void)f;
	eoi();
}

static void on_uart(struct trap_frame *f)
{
	(void)f;
	if (uart_hold_percent && ticks > 1) {
		u64 per_tick = (tsc_last_tick - tsc_first_tick) / (ticks - 1);
		for (u64 until = rdtsc() + per_tick * uart_hold_percent / 100; rdtsc() < until;)
			__asm__ volatile("pause");
	}
	if ((inb(COM1 + UART_IIR) & 0x0f) == 0x02)	/* reading IIR acknowledges THR empty */
		uart_irqs++;
	else
		uart_other++;
	outb(COM1 + UART_IER, 0);	/* our own output would raise it again */
	eoi();
}

static void on_spurious(struct trap_frame *f) { (void)f; }

static void ioapic_write(u32 reg, u32 value)
{
	mmio_write32(IOAPIC, reg);
	mmio_write32(IOAPIC + 0x10, value);
}

static void timer_start(u8 vector)
{
	mmio_write32(LAPIC + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	mmio_write32(LAPIC + LAPIC_TIMER_DIV, TIMER_DIV16);
	mmio_write32(LAPIC + LAPIC_LVT_TIMER, LVT_PERIODIC | vector);
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, TIMER_COUNT);
}

/* ---- dirtying ---- */

static u64 dirty_per_tick, dirty_pages, dirty_cursor, dirty_tick;

static u64 dirty_expected(u64 p, u64 writes)	/* value of page p after `writes` page writes */
{
	u64 laps = writes / dirty_pages + (p < writes % dirty_pages ? 1 : 0);
	return laps ? pattern(SEED_DIRTY, p, laps) : 0;
}

/* N page writes for each tick since the last call (at most 100 ticks' worth at once). */
static void dirty_catch_up(void)
{
	if (!dirty_per_tick)
		return;
	u64 now = ticks, due = now - dirty_tick;
	if (due > 100)
		due = 100;
	dirty_tick = now;
	for (u64 n = due * dirty_per_tick; n; n--) {
		u64 p = dirty_cursor % dirty_pages;
		volatile u64 *q = (volatile u64 *)(DIRTY_BASE + p * 4096);
		u64 lap = dirty_cursor / dirty_pages;
		if (*q != (lap ? pattern(SEED_DIRTY, p, lap) : 0)) {
			printf("error=dirty page=%lu write=%lu\n", p, dirty_cursor);
			debug_exit(EXIT_FAILURE);
		}
		*q = pattern(SEED_DIRTY, p, lap + 1);
		dirty_cursor++;
	}
}

/* Sleeps until `ticks` reaches `target`. */
static void wait_ticks(u64 target)
{
	while (ticks < target) {
		sleep();
		dirty_catch_up();
	}
}

/* ---- application processors ---- */

/* The AP's continuation in long mode: a stack of its own, then stateful_ap_main(slot). */
__asm__(
	".pushsection .text.stateful_ap, \"ax\"\n"
	".globl stateful_ap\n"
	"stateful_ap:\n"
	"	mov $1, %ecx\n"
	"	lock xadd %ecx, ap_next_slot(%rip)\n"
	"	cmp $" "15" ", %ecx\n"		/* MAX_CPUS - 1 APs at most */
	"	jae halt_forever\n"
	"	lea 1(%rcx), %eax\n"
	"	shl $12, %rax\n"
	"	lea ap_stacks(%rip), %rsp\n"
	"	add %rax, %rsp\n"
	"	mov %ecx, %edi\n"
	"	call stateful_ap_main\n"
	"	jmp halt_forever\n"
	".popsection\n");

void __attribute__((used)) stateful_ap_main(u32 slot)
{
	idt_load();
	timer_start(VEC_AP_TIMER);
	__atomic_fetch_add(&ap_online, 1, __ATOMIC_SEQ_CST);
	for (;;) {
		sleep();
		ap_count[slot]++;
	}
}

/* ---- virtio ---- */

static struct vdev blk_dev, con_dev;
static struct vring blk_ring, con_rings[2];
static struct vq blk_vq, con_rx, con_tx;

struct blk_hdr {
	u32 type, reserved;
	u64 sector;
};
static struct blk_hdr blk_hdr;
static volatile u8 blk_status;
static u64 sector_buf[64] __attribute__((aligned(512)));

static void find(struct vdev *d, u32 type, int mmio, const char *what)
{
	if (mmio ? !virtio_find_mmio(d, cmdline, type) : !virtio_find_pci(d, type, 0x6))
		fail(what);
}

static void setup_queue(struct vdev *d, struct vq *vq, u16 index, struct vring *ring)
{
	virtio_queue_setup(d, vq, index, virtio_queue_max(d, index), ring, -1);
}

/* One request in descriptors 0..2, polled. Returns the device's status byte. */
static u8 blk_request(u32 type, u64 sector, void *buf)
{
	struct vq *vq = &blk_vq;
	blk_hdr = (struct blk_hdr){ type, 0, sector };
	blk_status = 0xff;
	vq->desc[0] = (struct desc){ (u64)&blk_hdr, sizeof(blk_hdr), DESC_NEXT, 1 };
	vq->desc[1] = (struct desc){ (u64)buf, 512, DESC_NEXT | (type == BLK_IN ? DESC_WRITE : 0), 2 };
	vq->desc[2] = (struct desc){ (u64)&blk_status, 1, DESC_WRITE, 0 };
	virtio_publish(vq, 0);
	virtio_kick(vq);
	if (!virtio_wait_used(vq, 1, 0))
		fail("blk request timed out");
	return blk_status;
}

static void blk_write(u64 k)
{
	for (u64 i = 0; i < 64; i++)
		sector_buf[i] = pattern(SEED_SECTOR, k, i);
	if (blk_request(BLK_OUT, k, sector_buf) != 0)
		fail("blk write");
}

/* Reads sector k and checks its pattern; returns the hash folded with its contents. */
static u64 blk_check(u64 k, u64 h)
{
	for (u64 i = 0; i < 64; i++)
		sector_buf[i] = 0;
	if (blk_request(BLK_IN, k, sector_buf) != 0)
		fail("blk read");
	for (u64 i = 0; i < 64; i++) {
		if (sector_buf[i] != pattern(SEED_SECTOR, k, i)) {
			printf("error=disk sector=%lu qword=%lu\n", k, i);
			debug_exit(EXIT_FAILURE);
		}
		h = mix(h, sector_buf[i]);
	}
	return h;
}

static char con_line[32];

static void con_write(u64 k)
{
	static const char prefix[] = "con step=";
	u32 n = 0;
	for (; prefix[n]; n++)
		con_line[n] = prefix[n];
	char digits[20];
	int d = 0;
	do {
		digits[d++] = '0' + k % 10;
		k /= 10;
	} while (k);
	while (d)
		con_line[n++] = digits[--d];
	con_line[n++] = '\n';
	struct vq *vq = &con_tx;
	vq->desc[0] = (struct desc){ (u64)con_line, n, 0, 0 };
	virtio_publish(vq, 0);
	virtio_kick(vq);
	if (!virtio_wait_used(vq, 1, 0))
		fail("console write timed out");
}

/* ---- pages ---- */

static void page_fill(u64 k)
{
	volatile u64 *p = page(k);
	for (u64 i = 0; i < 512; i++)
		p[i] = pattern(SEED_PAGE, k, i);
}

static void page_bad(u64 k, u64 i)
{
	printf("error=page page=%lu qword=%lu\n", k, i);
	debug_exit(EXIT_FAILURE);
}

static void page_sample(u64 k)
{
	static const u64 sample[3] = { 0, 256, 511 };
	for (int s = 0; s < 3; s++)
		if (page(k)[sample[s]] != pattern(SEED_PAGE, k, sample[s]))
			page_bad(k, sample[s]);
}

static u64 page_check(u64 k, u64 h)
{
	volatile u64 *p = page(k);
	for (u64 i = 0; i < 512; i++) {
		u64 v = p[i];
		if (v != pattern(SEED_PAGE, k, i))
			page_bad(k, i);
		h = mix(h, v);
	}
	return h;
}

/* ---- the run ---- */

static u64 arg(const char *key, u64 dflt, u64 max)
{
	u64 v = dflt;
	cmdline_uint(cmdline, key, &v);
	if (v > max) {
		printf("error=%s above %lu\n", key, max);
		debug_exit(EXIT_FAILURE);
	}
	return v;
}

void guest_main(struct hvm_start_info *si)
{
	uart_init();
	const char *cl = pvh_cmdline(si);
	u32 n = 0;
	for (; cl[n] && n < sizeof(cmdline) - 1; n++)
		cmdline[n] = cl[n];
	cmdline[n] = 0;

	u64 steps = arg("steps", 40, MAX_STEPS), per_step = arg("ticks", 5, 1000);
	u64 blk = arg("blk", 0, 1), con = arg("con", 0, 1), mmio = arg("mmio", 0, 1);
	u64 cpus = arg("cpus", 1, MAX_CPUS), touch = arg("touch", 0, 4096), dense = arg("dense", 0, 32);
	dirty_per_tick = arg("dirty", 0, 65536);
	dirty_pages = arg("dirtymb", 64, 1u << 20) << 8;
	uart_hold_percent = arg("uarthold", 0, 90);
	if (!steps || !per_step || !cpus)
		fail("steps, ticks and cpus must be at least 1");
	u64 ram_end = pvh_ram_bytes(si) + (1ul << 20);	/* roughly: RAM starts at 0 and 1 MiB */
	if (PAGES_BASE + (steps + 1) * 4096 > ram_end || (touch && TOUCH_BASE + (touch << 20) > ram_end)
	    || (dense && DENSE_BASE + (dense << 20) > ram_end)
	    || (dirty_per_tick && (DIRTY_BASE + dirty_pages * 4096 > ram_end || !dirty_pages)))
		fail("not enough RAM");
	printf("stateful steps=%lu cpus=%lu blk=%lu con=%lu\n", steps, cpus, blk, con);

	idt_init();
	idt_set_handler(VEC_TIMER, on_timer);
	idt_set_handler(VEC_AP_TIMER, on_ap_timer);
	idt_set_handler(VEC_UART, on_uart);
	idt_set_handler(VEC_SPURIOUS, on_spurious);
	outb(0x21, 0xff);			/* both 8259s masked: the firmware may have left the PIT on */
	outb(0xa1, 0xff);
	mmio_write32(LAPIC + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	ioapic_write(0x10 + 2 * 4 + 1, 0);	/* COM1, pin 4 → APIC ID 0 */
	ioapic_write(0x10 + 2 * 4, VEC_UART);	/* fixed, edge, active high, unmasked */
	outb(COM1 + UART_MCR, 0x0b);		/* DTR, RTS, OUT2 */

	if (touch) {
		for (u64 p = 0; p < touch << 8; p++)
			*(volatile u64 *)(TOUCH_BASE + p * 4096) = pattern(SEED_TOUCH, p, 0);
		printf("touch=%lu\n", touch);
	}
	if (dense) {
		for (u64 p = 0; p < dense << 8; p++) {
			u64 value = pattern(SEED_DENSE, p, 0), count = 512;
			void *to = (void *)(DENSE_BASE + p * 4096);
			__asm__ volatile("rep stosq" : "+D"(to), "+c"(count) : "a"(value) : "memory");
		}
		printf("dense=%lu\n", dense);
	}

	if (blk) {
		find(&blk_dev, 2, mmio, "no virtio-blk device");
		virtio_negotiate(&blk_dev, 0);
		setup_queue(&blk_dev, &blk_vq, 0, &blk_ring);
		virtio_driver_ok(&blk_dev);
		u64 capacity = (u64)virtio_cfg32(&blk_dev, 0) | (u64)virtio_cfg32(&blk_dev, 4) << 32;
		if (capacity < steps + 1)
			fail("disk smaller than steps+1 sectors");
	}
	if (con) {
		find(&con_dev, 3, mmio, "no virtio-console device");
		virtio_negotiate(&con_dev, 0);
		setup_queue(&con_dev, &con_rx, 0, &con_rings[0]);
		setup_queue(&con_dev, &con_tx, 1, &con_rings[1]);
		virtio_driver_ok(&con_dev);
	}

	u32 aps = cpus - 1;
	if (aps)
		smp_start_aps(stateful_ap);
	timer_start(VEC_TIMER);
	/* The APs have 2 s (200 ticks) to come up. */
	while (ap_online < aps && ticks < 200)
		sleep();
	if (ap_online != aps) {
		printf("error=aps online=%u\n", ap_online);
		debug_exit(EXIT_FAILURE);
	}
	u64 ap_last[MAX_CPUS];
	for (u32 s = 0; s < aps; s++)
		ap_last[s] = ap_count[s];

	u64 start = ticks;
	for (u64 k = 1; k <= steps; k++) {
		wait_ticks(start + k * per_step);

		page_fill(k);
		for (u64 j = 1; j < k; j++)
			page_sample(j);

		outb(COM1 + UART_IER, IER_THRI);	/* THR is empty: raised at once */
		for (u64 t0 = ticks; uart_irqs < k;) {
			if (ticks - t0 > 100)
				fail("uart interrupt missing");
			sleep();
		}

		if (blk) {
			blk_write(k);
			if (k > 1)
				blk_check(k - 1, 0);
		}
		if (con)
			con_write(k);

		/* Each AP's count must move within five seconds (normally it has by now; the
		 * margin is for a host so loaded that a vCPU thread waits long for a core). */
		for (u32 s = 0; s < aps; s++) {
			for (u64 t0 = ticks; ap_count[s] == ap_last[s];) {
				if (ticks - t0 > 500) {
					printf("error=ap stalled slot=%u\n", s);
					debug_exit(EXIT_FAILURE);
				}
				sleep();
			}
			ap_last[s] = ap_count[s];
		}
		printf("step=%lu\n", k);
	}

	u64 h = mix(0xcbf29ce484222325ul, steps);
	for (u64 k = 1; k <= steps; k++)
		h = page_check(k, h);
	printf("pages_ok=%lu\n", steps);
	if (blk) {
		for (u64 k = 1; k <= steps; k++)
			h = blk_check(k, h);
		printf("disk_ok=%lu\n", steps);
	}
	if (touch) {
		for (u64 p = 0; p < touch << 8; p++) {
			u64 v = *(volatile u64 *)(TOUCH_BASE + p * 4096);
			if (v != pattern(SEED_TOUCH, p, 0)) {
				printf("error=touched page=%lu\n", p);
				debug_exit(EXIT_FAILURE);
			}
			h = mix(h, v);
		}
		printf("touched_ok=%lu\n", touch << 8);
	}
	if (dense) {
		for (u64 p = 0; p < dense << 8; p++) {
			u64 value = pattern(SEED_DENSE, p, 0), count = 512;
			const void *at = (const void *)(DENSE_BASE + p * 4096);
			u8 same;
			__asm__ volatile("repe scasq; sete %2" : "+D"(at), "+c"(count), "=q"(same) : "a"(value) : "memory", "cc");
			if (!same) {
				printf("error=dense page=%lu qword=%lu\n", p, 511 - count);
				debug_exit(EXIT_FAILURE);
			}
		}
		printf("dense_ok=%lu\n", dense << 8);
	}
	if (dirty_per_tick) {
		for (u64 p = 0; p < dirty_pages; p++) {
			if (*(volatile u64 *)(DIRTY_BASE + p * 4096) != dirty_expected(p, dirty_cursor)) {
				printf("error=dirty page=%lu at end\n", p);
				debug_exit(EXIT_FAILURE);
			}
		}
		printf("dirty_ok=%lu\n", dirty_cursor);
	}
	if (uart_irqs != steps || uart_other) {
		printf("error=uart_irqs %lu other=%lu\n", uart_irqs, uart_other);
		debug_exit(EXIT_FAILURE);
	}
	printf("uart_irqs=%lu\n", uart_irqs);
	if (aps)
		printf("aps_ok=%u\n", aps);
	printf("info ticks=%lu\n", ticks);
	if (ticks > 1)
		printf("info tsc_per_tick=%lu\n", (tsc_last_tick - tsc_first_tick) / (ticks - 1));
	for (u32 s = 0; s < aps; s++)
		printf("info ap%u_wakeups=%lu\n", s, ap_count[s]);
	printf("result=0x%lx\n", h);
	debug_exit(EXIT_STATEFUL);
}
