/*
 * floor: the smallest honest VMM for a PVH guest, the baseline HyperCore's
 * benchmarks are measured against. One thread, raw KVM ioctls, and only the
 * devices the test guests' protocol needs (Tests/Guests/README.md):
 *
 *   COM1 THR (0x3F8) writes go to stdout, LSR (0x3FD) reads 0x60;
 *   debug exit (0x501): exit status v; i8042 0xFE on 0x64: exit status 0;
 *   HLT or triple fault: exit status 3; VMM errors: exit status 125.
 *
 * usage: floor KERNEL.elf [cmdline] [mem_mib]
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Guest-physical layout below the kernel's 1 MiB. */
#define START_INFO_ADDR	0x6000
#define MEMMAP_ADDR	0x6040
#define CMDLINE_ADDR	0x7000
#define CMDLINE_MAX	0x1000
#define HIGH_MEM	0x100000
#define LOW_MEM_END	0xa0000

/* Three pages KVM needs for real-mode emulation, just below the BIOS area. */
#define IDENTITY_MAP_ADDR 0xfffbc000
#define TSS_ADDR	0xfffbd000

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC	0x336ec578
#define E820_RAM	1

#define EXIT_HALT	3
#define EXIT_VMM_ERROR	125

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};

struct hvm_memmap_entry {
	uint64_t addr, size;
	uint32_t type, reserved;
};

static uint8_t *mem;
static uint64_t mem_size;

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fputs("floor: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(EXIT_VMM_ERROR);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *name)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		fail("%s: %s", name, strerror(errno));
	return r;
}
#define IOCTL(fd, req, arg) xioctl(fd, req, (void *)(arg), #req)

static void *guest(uint64_t gpa, uint64_t len)
{
	if (gpa > mem_size || len > mem_size - gpa)
		fail("guest range 0x%lx+0x%lx is outside memory", gpa, len);
	return mem + gpa;
}

/* Copies the PT_LOAD segments into guest memory; returns the PVH entry. */
static uint32_t load_pvh_elf(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		fail("%s: %s", path, strerror(errno));
	size_t size = st.st_size;
	const uint8_t *file = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (file == MAP_FAILED)
		fail("%s: %s", path, strerror(errno));
	close(fd);

	const Elf64_Ehdr *eh = (const void *)file;
	if (size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) ||
	    eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64 ||
	    eh->e_phentsize != sizeof(Elf64_Phdr) ||
	    eh->e_phoff > size || (size - eh->e_phoff) / sizeof(Elf64_Phdr) < eh->e_phnum)
		fail("%s: not an x86-64 ELF image", path);

	uint32_t entry = 0;
	const Elf64_Phdr *ph = (const void *)(file + eh->e_phoff);
	for (int i = 0; i < eh->e_phnum; i++, ph++) {
		if (ph->p_offset > size || ph->p_filesz > size - ph->p_offset)
			fail("%s: segment %d lies outside the file", path, i);
		if (ph->p_type == PT_LOAD) {
			if (ph->p_filesz > ph->p_memsz)
				fail("%s: segment %d: file size exceeds memory size", path, i);
			/* Fresh anonymous memory is already zero beyond p_filesz. */
			memcpy(guest(ph->p_paddr, ph->p_memsz), file + ph->p_offset, ph->p_filesz);
		} else if (ph->p_type == PT_NOTE) {
			const uint8_t *p = file + ph->p_offset, *end = p + ph->p_filesz;
			while (end - p >= (long)sizeof(Elf64_Nhdr)) {
				const Elf64_Nhdr *n = (const void *)p;
				const uint8_t *name = p + sizeof(*n);
				const uint8_t *desc = name + ((n->n_namesz + 3) & ~3u);
				p = desc + ((n->n_descsz + 3) & ~3u);
				if (p > end)
					break;
				if (n->n_type == XEN_ELFNOTE_PHYS32_ENTRY && n->n_namesz == 4 &&
				    !memcmp(name, "Xen", 4) && n->n_descsz >= 4)
					memcpy(&entry, desc, 4);
			}
		}
	}
	munmap((void *)file, size);
	if (!entry)
		fail("%s: no Xen PVH entry note", path);
	return entry;
}

static void write_start_info(const char *cmdline)
{
	size_t len = strlen(cmdline);
	if (len >= CMDLINE_MAX)
		fail("command line longer than %d bytes", CMDLINE_MAX - 1);
	memcpy(guest(CMDLINE_ADDR, len + 1), cmdline, len + 1);

	struct hvm_memmap_entry map[] = {
		{ .addr = 0, .size = LOW_MEM_END, .type = E820_RAM },
		{ .addr = HIGH_MEM, .size = mem_size - HIGH_MEM, .type = E820_RAM },
	};
	memcpy(guest(MEMMAP_ADDR, sizeof(map)), map, sizeof(map));

	struct hvm_start_info si = {
		.magic = HVM_START_MAGIC,
		.version = 1,
		.cmdline_paddr = CMDLINE_ADDR,
		.memmap_paddr = MEMMAP_ADDR,
		.memmap_entries = sizeof(map) / sizeof(map[0]),
	};
	memcpy(guest(START_INFO_ADDR, sizeof(si)), &si, sizeof(si));
}

static void set_cpuid(int kvm, int vcpu)
{
	for (int n = 64;; n *= 2) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(c->entries[0]));
		if (!c)
			fail("out of memory");
		c->nent = n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			IOCTL(vcpu, KVM_SET_CPUID2, c);
			free(c);
			return;
		}
		free(c);
		if (errno != E2BIG)
			fail("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
	}
}

/* The PVH ABI: flat 32-bit protected mode, paging off, EBX = start info. */
static void set_pvh_registers(int vcpu, uint32_t entry)
{
	struct kvm_sregs sregs;
	IOCTL(vcpu, KVM_GET_SREGS, &sregs);
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 0xb,
		.present = 1, .db = 1, .s = 1, .g = 1,
	};
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 0x3;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.tr = (struct kvm_segment){ .selector = 0x18, .limit = 0x67, .type = 0xb, .present = 1 };
	sregs.cr0 = 0x11;	/* PE, ET */
	sregs.cr4 = 0;
	sregs.efer = 0;
	IOCTL(vcpu, KVM_SET_SREGS, &sregs);

	struct kvm_regs regs = { .rip = entry, .rbx = START_INFO_ADDR, .rflags = 0x2 };
	IOCTL(vcpu, KVM_SET_REGS, &regs);
}

static void __attribute__((noreturn)) finish(int status)
{
	fflush(stdout);
	exit(status);
}

static void port_io(struct kvm_run *run)
{
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	uint16_t port = run->io.port;

	for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
		if (run->io.direction == KVM_EXIT_IO_IN) {
			/* An idle 16550A; nothing else answers on this bus. */
			memset(data, port == 0x3fd ? 0x60 : 0xff, run->io.size);
			continue;
		}
		if (port == 0x3f8)
			putchar(data[0]);
		else if (port == 0x501)
			finish(data[0]);
		else if (port == 0x64 && data[0] == 0xfe)
			finish(0);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 4) {
		fprintf(stderr, "usage: floor KERNEL.elf [cmdline] [mem_mib]\n");
		return EXIT_VMM_ERROR;
	}
	const char *cmdline = argc > 2 ? argv[2] : "";
	long mib = argc > 3 ? atol(argv[3]) : 128;
	if (mib < 2 || mib > 3072)
		fail("memory must be 2..3072 MiB (below the 3 GiB MMIO hole)");
	mem_size = (uint64_t)mib << 20;
	setvbuf(stdout, NULL, _IOLBF, 0);	/* a killed guest keeps its last lines */

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		fail("/dev/kvm: %s", strerror(errno));
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		fail("unsupported KVM API version");
	int vm = IOCTL(kvm, KVM_CREATE_VM, 0);
	IOCTL(vm, KVM_SET_TSS_ADDR, TSS_ADDR);
	uint64_t identity_map = IDENTITY_MAP_ADDR;
	IOCTL(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity_map);

	mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		fail("guest memory: %s", strerror(errno));
	struct kvm_userspace_memory_region slot = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
		.userspace_addr = (uintptr_t)mem,
	};
	IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &slot);
	/*
	 * After the memory slot: on this project's PVM hosts adding the first
	 * slot to a VM that already has an irqchip costs about 5 ms more.
	 */
	IOCTL(vm, KVM_CREATE_IRQCHIP, 0);
	struct kvm_pit_config pit = { .flags = 0 };
	IOCTL(vm, KVM_CREATE_PIT2, &pit);

	uint32_t entry = load_pvh_elf(argv[1]);
	write_start_info(cmdline);

	int vcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);
	int run_size = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		fail("kvm_run: %s", strerror(errno));
	set_cpuid(kvm, vcpu);
	set_pvh_registers(vcpu, entry);

	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fail("KVM_RUN: %s", strerror(errno));
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			port_io(run);
			break;
		case KVM_EXIT_MMIO:
			/* Nothing is mapped there: writes vanish, reads give 0. */
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0, sizeof(run->mmio.data));
			break;
		case KVM_EXIT_HLT:
		case KVM_EXIT_SHUTDOWN:
			finish(EXIT_HALT);
		case KVM_EXIT_INTERNAL_ERROR:
			fail("internal error, suberror %u", run->internal.suberror);
		default:
			fail("unexpected exit reason %u", run->exit_reason);
		}
	}
}
