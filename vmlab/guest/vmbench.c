/*
 * vmbench - micro-benchmarks for the vmlab guest image (and the host).
 *
 * Build:  gcc -static -O2 -Wall -o vmbench vmbench.c     (libc only, no libm)
 *
 * The same binary runs inside the busybox guest (often under QEMU TCG, which
 * is 10-50x slower than native) and natively on the host, so numbers compare.
 * Every subcommand prints exactly ONE JSON object on ONE line to stdout.
 * Errors go to stderr; exit status 2 = bad usage, 1 = runtime failure (then a
 * {"test":..., "error": "..."} object is also printed on stdout).
 * Wall time: clock_gettime(CLOCK_MONOTONIC).  CPU time: getrusage(RUSAGE_SELF)
 * taken around the measured region (user_s / sys_s are deltas).
 * Integer arguments accept an optional binary suffix k, m, g (x1024^n).
 *
 * Subcommands
 * -----------
 * disk --dev PATH --mode read|write --pattern seq|rand --bs BYTES --total BYTES
 *      [--direct] [--offset BYTES] [--seed N]
 *     total/bs operations of bs bytes each (pread/pwrite).  seq walks from
 *     --offset and wraps at the end of the device/file; rand picks bs-aligned
 *     offsets in [offset, devsize) (devsize: BLKGETSIZE64 for block devices,
 *     st_size for files; a file too small for a write uses offset+total).
 *     --direct opens with O_DIRECT (bs and offset must be multiples of 512;
 *     the buffer is 4096-aligned).  write fills the buffer with a non-zero
 *     pattern and calls fdatasync at the end (inside the timed region).
 *     Each operation is timed: median and p99 latency are reported.
 *     -> {"test":"disk","mode","pattern","bs","bytes","ops","seconds",
 *         "throughput_mb_s","lat_us_median","lat_us_p99","user_s","sys_s"}
 *
 * write --path PATH --bs BYTES --total BYTES
 *     Writes total bytes ('a'..'z' repeating, no newlines) in bs chunks to a
 *     console/serial character device or a file (created/truncated).  A tty
 *     is put in raw mode (cfmakeraw, CLOCAL, 115200 baud) and tcdrain()ed at
 *     the end (inside the timed region); its settings are restored afterwards.
 *     -> {"test":"write","path","bs","bytes","seconds","throughput_mb_s",
 *         "user_s","sys_s"}
 *
 * udp-send --dst IP --port P --size BYTES --count N [--rate-pps R]
 *     Sends N datagrams of `size` bytes (first 8: big-endian sequence number).
 *     ENOBUFS/EAGAIN/ENOMEM/EINTR/ECONNREFUSED are counted in "errors" and the
 *     datagram is retried.  --rate-pps paces the sends.
 *     -> {"test":"udp-send","size","count","bytes","seconds","pps",
 *         "throughput_mb_s","errors"}
 *
 * udp-recv --port P --count N [--timeout-ms T]      (T default 2000)
 *     Binds 0.0.0.0:P, prints "READY" on stderr, then receives until N
 *     datagrams arrived or T ms passed without one (T ms in total while none
 *     has arrived yet).  seconds = first to last datagram.
 *     -> {"test":"udp-recv","received","bytes","seconds","pps",
 *         "throughput_mb_s","lost"}            (lost = count - received)
 *
 * udp-rr --dst IP --port P --size BYTES --count N [--timeout-ms T]
 *     Request/response: send one datagram, wait up to T ms (default 1000) for
 *     a reply from the peer (stale replies carrying an older sequence number
 *     are skipped), record the round-trip time.  RTT fields are null when no
 *     reply arrived.
 *     -> {"test":"udp-rr","size","count","replies","rtt_us_median",
 *         "rtt_us_p99","rtt_us_min","seconds"}
 *
 * udp-echo --port P --count N [--timeout-ms T]      (T default 2000)
 *     Binds 0.0.0.0:P, prints "READY" on stderr, echoes every datagram back to
 *     its sender until N were echoed or T ms of silence (as udp-recv).
 *     -> {"test":"udp-echo","echoed"}
 *
 * cpu [--bench NAME[,NAME...]] [--repeats R] [--scale F]
 *     Nano-benchmarks, each run R times (default 5) after one untimed warm-up
 *     of a tenth of the work; iteration counts are multiplied by F (default 1,
 *     where each repeat takes roughly 20-100 ms natively).  Benchmarks:
 *       null_syscall   syscall(SYS_getppid)
 *       page_fault     first touch of anonymous pages (mmap 16 MiB chunks with
 *                      MADV_NOHUGEPAGE, touch 1 byte/page, munmap); per page
 *       port_io        inb from port 0x80 after ioperm (skipped w/o root)
 *       signal_fpe     integer divide by zero -> SIGFPE handler -> siglongjmp
 *       mprotect       toggle PROT_READ / PROT_READ|PROT_WRITE on a touched page
 *       mmap_munmap    mmap one anonymous page, touch it, munmap
 *       clock_gettime  clock_gettime(CLOCK_MONOTONIC) (+ "clocksource" field)
 *       rdtsc          raw rdtsc reads
 *       compute        xorshift64 + multiply-accumulate ALU loop; per iteration
 *       memory_bw      memcpy between two buffers of 32 MiB x min(F,1) (at
 *                      least 1 MiB), repeated over the buffer; ns per 4 KiB
 *                      copied (+ "mb_s" field, MB = 1e6 bytes)
 *       fork_wait      fork + child _exit + waitpid ("forkwait")
 *     -> {"test":"cpu","results":[{"benchmark","iterations","repeats",
 *         "ns_per_op" (median),"ns_min","ns_max","ns_cv" (stdev/mean),
 *         "cycles_per_op" (median rdtsc delta per op),"samples_ns":[..]},..]}
 *        A skipped benchmark is {"benchmark":..,"skipped":"reason"}.
 *
 * spin --seconds S
 *     CPU-bound compute loop for S seconds of wall time (clock checked every
 *     2^20 iterations).  steal_ticks: delta of the steal column of the "cpu"
 *     line of /proc/stat (null if unreadable).
 *     -> {"test":"spin","seconds","ops","ops_per_s","user_s","sys_s",
 *         "steal_ticks"}
 *
 * touch --mb N [--hold-ms T]
 *     mmap N MiB anonymous memory, write one byte per page, print the result,
 *     then sleep T ms (default 0) before exiting so a host can observe RSS.
 *     -> {"test":"touch","mb","seconds","mb_s"}
 *
 * dirty --mb N --rate-mbs R [--seconds S] [--beat-ms T] [--dst IP --port P]
 *       [--counter PATH]
 *     A live-migration workload: mmap N MiB of anonymous memory, touch every
 *     page, then write one 8-byte word per 4 KiB page, walking the region
 *     round-robin, at R MiB of pages per second (R = 0: no writes, heartbeat
 *     only; R >= 100000: as fast as it can). Bursts after a stall are capped
 *     at 10 ms of work. Every T ms (default 5) a heartbeat: the beat counter
 *     goes up, a 28-byte UDP datagram ("VMHB", seq, guest CLOCK_MONOTONIC ns,
 *     pages written so far; big-endian) goes to IP:P if given, and the
 *     counter is written to PATH if given. Runs S seconds (0, the default:
 *     until SIGTERM/SIGINT). max_gap_ms is the longest gap between beats on
 *     the guest's own monotonic clock. At the end every page written is
 *     checked: it must still hold the value of its last write (stale_pages
 *     counts those that do not: writes that were lost, e.g. by a migration).
 *     -> {"test":"dirty","mb","rate_mbs","seconds","pages_written",
 *         "achieved_mbs","beats","beat_ms","max_gap_ms","send_errors",
 *         "pages_checked","stale_pages"}
 *
 * sysinfo
 *     -> {"test":"sysinfo","hypervisor_bit" (CPUID.1:ECX[31]),
 *         "hypervisor_vendor" (CPUID 0x40000000 EBX,ECX,EDX; null if no bit),
 *         "hypervisor_max_leaf","cpu_vendor","cpu_brand","clocksource_current",
 *         "clocksources_available":[..],"nproc","mem_total_kb"}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/io.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

static const char *usage_text =
"usage: vmbench SUBCOMMAND [OPTIONS]   (prints one JSON object on stdout)\n"
"  disk --dev PATH --mode read|write --pattern seq|rand --bs BYTES --total BYTES\n"
"       [--direct] [--offset BYTES] [--seed N]\n"
"  write --path PATH --bs BYTES --total BYTES\n"
"  udp-send --dst IP --port P --size BYTES --count N [--rate-pps R]\n"
"  udp-recv --port P --count N [--timeout-ms T]   (prints READY on stderr)\n"
"  udp-rr   --dst IP --port P --size BYTES --count N [--timeout-ms T]\n"
"  udp-echo --port P --count N [--timeout-ms T]   (prints READY on stderr)\n"
"  cpu [--bench NAME[,NAME...]] [--repeats R] [--scale F]\n"
"       benchmarks: null_syscall page_fault port_io signal_fpe mprotect\n"
"       mmap_munmap clock_gettime rdtsc compute memory_bw fork_wait\n"
"  spin --seconds S\n"
"  touch --mb N [--hold-ms T]\n"
"  dirty --mb N --rate-mbs R [--seconds S] [--beat-ms T] [--dst IP --port P]\n"
"        [--counter PATH]\n"
"  sysinfo\n"
"Sizes accept a k/m/g suffix (powers of 1024). Exit status: 0 ok, 1 runtime\n"
"error, 2 bad usage. See the header of vmbench.c for every output field.\n";

static const char *g_sub = "vmbench";   /* current subcommand, for messages */

/* ------------------------------------------------------------------ */
/* errors                                                              */

static void json_str(const char *s);

static void __attribute__((noreturn, format(printf, 1, 2)))
die_usage(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "vmbench %s: ", g_sub);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs(" (see vmbench --help)\n", stderr);
    exit(2);
}

static void __attribute__((noreturn, format(printf, 1, 2)))
die_rt(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "vmbench %s: %s\n", g_sub, msg);
    fputs("{\"test\":", stdout);
    json_str(g_sub);
    fputs(",\"error\":", stdout);
    json_str(msg);
    fputs("}\n", stdout);
    fflush(stdout);
    exit(1);
}

/* ------------------------------------------------------------------ */
/* JSON output (single line)                                           */

static int j_comma;

static void json_str(const char *s)
{
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') { putchar('\\'); putchar(*p); }
        else if (*p < 0x20 || *p == 0x7f) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static void j_key(const char *k)
{
    if (j_comma) putchar(',');
    j_comma = 0;
    if (k) { json_str(k); putchar(':'); }
}
static void j_open(const char *k)  { j_key(k); putchar('{'); j_comma = 0; }
static void j_close(void)          { putchar('}'); j_comma = 1; }
static void j_aopen(const char *k) { j_key(k); putchar('['); j_comma = 0; }
static void j_aclose(void)         { putchar(']'); j_comma = 1; }
static void j_null(const char *k)  { j_key(k); fputs("null", stdout); j_comma = 1; }
static void j_bool(const char *k, int v) { j_key(k); fputs(v ? "true" : "false", stdout); j_comma = 1; }
static void j_u64(const char *k, uint64_t v) { j_key(k); printf("%llu", (unsigned long long)v); j_comma = 1; }
static void j_i64(const char *k, int64_t v) { j_key(k); printf("%lld", (long long)v); j_comma = 1; }
static void j_num(const char *k, double v)
{
    j_key(k);
    if (isfinite(v)) printf("%.9g", v); else fputs("null", stdout);
    j_comma = 1;
}
static void j_str(const char *k, const char *v)
{
    if (!v) { j_null(k); return; }
    j_key(k); json_str(v); j_comma = 1;
}
static void j_end(void)
{
    putchar('\n');
    if (fflush(stdout) != 0) { perror("vmbench: stdout"); exit(1); }
}

/* ------------------------------------------------------------------ */
/* small helpers                                                        */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t rdtsc(void)
{
#if HAVE_X86
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
#else
    return 0;
#endif
}

static double my_sqrt(double v)     /* no libm */
{
    if (!(v > 0)) return 0;
    double x = v > 1 ? v : 1;
    for (int i = 0; i < 200; i++) {
        double nx = 0.5 * (x + v / x);
        if (nx == x) break;
        x = nx;
    }
    return x;
}

static double tv_s(struct timeval tv) { return tv.tv_sec + tv.tv_usec / 1e6; }

typedef struct { struct rusage ru; } cpu_mark;
static void cpu_mark_get(cpu_mark *m) { getrusage(RUSAGE_SELF, &m->ru); }
static void j_cpu_delta(const cpu_mark *a, const cpu_mark *b)
{
    j_num("user_s", tv_s(b->ru.ru_utime) - tv_s(a->ru.ru_utime));
    j_num("sys_s", tv_s(b->ru.ru_stime) - tv_s(a->ru.ru_stime));
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}
static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of a sorted array, p in (0,1] */
static uint64_t pct_u64(const uint64_t *s, size_t n, double p)
{
    double k = p * (double)n;
    size_t idx = (size_t)k;
    if ((double)idx < k) idx++;
    if (idx < 1) idx = 1;
    if (idx > n) idx = n;
    return s[idx - 1];
}

static double median_dbl(const double *v, size_t n)
{
    double tmp[n ? n : 1];
    memcpy(tmp, v, n * sizeof *v);
    qsort(tmp, n, sizeof *tmp, cmp_dbl);
    return (n & 1) ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
}

/* read a small file, strip trailing whitespace; returns 0 on success */
static int read_small(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        buf[--n] = 0;
    return 0;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* ------------------------------------------------------------------ */
/* argument parsing                                                     */

static uint64_t parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max)
{
    if (!s || !*s || *s < '0' || *s > '9')
        die_usage("invalid value for %s: '%s' (expected an integer >= %llu)",
                  opt, s ? s : "", (unsigned long long)min);
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) die_usage("invalid value for %s: '%s' (out of range)", opt, s);
    uint64_t mul = 1;
    if (*end) {
        switch (*end) {
        case 'k': case 'K': mul = 1ull << 10; break;
        case 'm': case 'M': mul = 1ull << 20; break;
        case 'g': case 'G': mul = 1ull << 30; break;
        default: mul = 0;
        }
        if (!mul || end[1])
            die_usage("invalid value for %s: '%s' (expected an integer, optional k/m/g suffix)", opt, s);
    }
    if (v > UINT64_MAX / mul) die_usage("invalid value for %s: '%s' (out of range)", opt, s);
    v *= mul;
    if (v < min || v > max)
        die_usage("invalid value for %s: '%s' (must be between %llu and %llu)", opt, s,
                  (unsigned long long)min, (unsigned long long)max);
    return v;
}

static double parse_dbl(const char *opt, const char *s, double min, double max)
{
    if (!s || !*s) die_usage("invalid value for %s: '' (expected a number)", opt);
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !isfinite(v))
        die_usage("invalid value for %s: '%s' (expected a number)", opt, s);
    if (!(v >= min && v <= max))
        die_usage("invalid value for %s: '%s' (must be > 0 and <= %g)", opt, s, max);
    return v;
}

static struct in_addr parse_ip(const char *opt, const char *s)
{
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1)
        die_usage("invalid value for %s: '%s' (expected an IPv4 address)", opt, s);
    return a;
}

/* getopt_long wrapper: returns option val, -1 at end; handles errors/help */
static int next_opt(int argc, char **argv, const struct option *lo)
{
    int idx = 0;
    int c = getopt_long(argc, argv, ":h", lo, &idx);
    if (c == 'h') { fputs(usage_text, stdout); exit(0); }
    if (c == '?') die_usage("unknown option '%s'", argv[optind - 1]);
    if (c == ':') die_usage("option '%s' requires a value", argv[optind - 1]);
    if (c == -1 && optind < argc) die_usage("unexpected argument '%s'", argv[optind]);
    return c;
}

#define REQUIRE(cond, name) do { if (!(cond)) die_usage("missing required option %s", name); } while (0)

#define MAX_BYTES (1ull << 50)
#define MAX_COUNT (1ull << 40)

/* ------------------------------------------------------------------ */
/* disk                                                                 */

static ssize_t full_io(int fd, int wr, char *buf, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = wr ? pwrite(fd, buf + done, n - done, off + (off_t)done)
                       : pread(fd, buf + done, n - done, off + (off_t)done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

static int cmd_disk(int argc, char **argv)
{
    enum { OPT_DEV = 1, OPT_MODE, OPT_PAT, OPT_BS, OPT_TOTAL, OPT_DIR, OPT_OFF, OPT_SEED };
    static const struct option lo[] = {
        {"dev", required_argument, 0, OPT_DEV}, {"mode", required_argument, 0, OPT_MODE},
        {"pattern", required_argument, 0, OPT_PAT}, {"bs", required_argument, 0, OPT_BS},
        {"total", required_argument, 0, OPT_TOTAL}, {"direct", no_argument, 0, OPT_DIR},
        {"offset", required_argument, 0, OPT_OFF}, {"seed", required_argument, 0, OPT_SEED},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *dev = NULL, *mode = NULL, *pat = NULL;
    uint64_t bs = 0, total = 0, offset = 0, seed = 1;
    int direct = 0, c;
    while ((c = next_opt(argc, argv, lo)) != -1) {
        switch (c) {
        case OPT_DEV: dev = optarg; break;
        case OPT_MODE:
            if (strcmp(optarg, "read") && strcmp(optarg, "write"))
                die_usage("invalid value for --mode: '%s' (read or write)", optarg);
            mode = optarg; break;
        case OPT_PAT:
            if (strcmp(optarg, "seq") && strcmp(optarg, "rand"))
                die_usage("invalid value for --pattern: '%s' (seq or rand)", optarg);
            pat = optarg; break;
        case OPT_BS: bs = parse_u64("--bs", optarg, 1, 1ull << 30); break;
        case OPT_TOTAL: total = parse_u64("--total", optarg, 1, MAX_BYTES); break;
        case OPT_DIR: direct = 1; break;
        case OPT_OFF: offset = parse_u64("--offset", optarg, 0, MAX_BYTES); break;
        case OPT_SEED: seed = parse_u64("--seed", optarg, 0, UINT64_MAX); break;
        }
    }
    REQUIRE(dev, "--dev"); REQUIRE(mode, "--mode"); REQUIRE(pat, "--pattern");
    REQUIRE(bs, "--bs"); REQUIRE(total, "--total");
    if (total < bs) die_usage("--total (%llu) must be >= --bs (%llu)",
                              (unsigned long long)total, (unsigned long long)bs);
    if (direct && (bs % 512 || offset % 512))
        die_usage("--bs and --offset must be multiples of 512 with --direct");
    uint64_t ops = total / bs;
    if (ops > (1ull << 27)) die_usage("--total/--bs gives too many operations (max 2^27)");
    int wr = !strcmp(mode, "write"), rnd = !strcmp(pat, "rand");

    int flags = (wr ? O_WRONLY | O_CREAT : O_RDONLY) | O_CLOEXEC | (direct ? O_DIRECT : 0);
    int fd = open(dev, flags, 0644);
    if (fd < 0)
        die_rt("open %s: %s%s", dev, strerror(errno),
               direct && errno == EINVAL ? " (O_DIRECT not supported here?)" : "");
    struct stat st;
    if (fstat(fd, &st) < 0) die_rt("fstat %s: %s", dev, strerror(errno));
    uint64_t devsize = 0;
    int have_size = 0;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &devsize) < 0) die_rt("BLKGETSIZE64 %s: %s", dev, strerror(errno));
        have_size = 1;
    } else if (S_ISREG(st.st_mode)) {
        devsize = (uint64_t)st.st_size;
        have_size = 1;
        if (wr && devsize < offset + total) devsize = offset + total;
    }
    uint64_t nblocks = 0;
    if (have_size) {
        if (devsize <= offset || (devsize - offset) / bs == 0)
            die_rt("%s: size %llu leaves no room for one %llu-byte block at offset %llu",
                   dev, (unsigned long long)devsize, (unsigned long long)bs,
                   (unsigned long long)offset);
        nblocks = (devsize - offset) / bs;
    } else if (rnd) {
        die_rt("%s: cannot determine the size for --pattern rand", dev);
    }

    char *buf;
    if (posix_memalign((void **)&buf, 4096, bs) != 0) die_rt("cannot allocate %llu bytes", (unsigned long long)bs);
    for (uint64_t i = 0; i < bs; i++) buf[i] = wr ? (char)(0xA5 ^ (i & 0x3f)) : 0;   /* never zero */
    uint64_t *lat = malloc(ops * sizeof *lat);
    if (!lat) die_rt("cannot allocate latency array for %llu ops", (unsigned long long)ops);

    uint64_t rs = seed;
    cpu_mark c0, c1;
    cpu_mark_get(&c0);
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < ops; i++) {
        uint64_t blk;
        if (rnd) blk = splitmix64(&rs) % nblocks;
        else blk = nblocks ? i % nblocks : i;
        off_t pos = (off_t)(offset + blk * bs);
        uint64_t a = now_ns();
        ssize_t r = full_io(fd, wr, buf, bs, pos);
        lat[i] = now_ns() - a;
        if (r < 0)
            die_rt("%s at offset %lld: %s%s", wr ? "pwrite" : "pread", (long long)pos, strerror(errno),
                   direct && errno == EINVAL ? " (O_DIRECT alignment?)" : "");
        if ((uint64_t)r != bs)
            die_rt("short %s at offset %lld (%zd of %llu bytes; end of device?)",
                   wr ? "write" : "read", (long long)pos, r, (unsigned long long)bs);
    }
    if (wr && fdatasync(fd) < 0 && errno != EINVAL && errno != EROFS)
        die_rt("fdatasync %s: %s", dev, strerror(errno));
    uint64_t t1 = now_ns();
    cpu_mark_get(&c1);
    close(fd);

    qsort(lat, ops, sizeof *lat, cmp_u64);
    double secs = (t1 - t0) / 1e9;
    uint64_t bytes = ops * bs;
    j_open(NULL);
    j_str("test", "disk"); j_str("mode", mode); j_str("pattern", pat);
    j_u64("bs", bs); j_u64("bytes", bytes); j_u64("ops", ops);
    j_num("seconds", secs);
    j_num("throughput_mb_s", secs > 0 ? bytes / 1e6 / secs : 0);
    j_num("lat_us_median", pct_u64(lat, ops, 0.5) / 1e3);
    j_num("lat_us_p99", pct_u64(lat, ops, 0.99) / 1e3);
    j_cpu_delta(&c0, &c1);
    j_close(); j_end();
    free(lat); free(buf);
    return 0;
}

/* ------------------------------------------------------------------ */
/* write (console / serial / file)                                      */

static int cmd_write(int argc, char **argv)
{
    enum { OPT_PATH = 1, OPT_BS, OPT_TOTAL };
    static const struct option lo[] = {
        {"path", required_argument, 0, OPT_PATH}, {"bs", required_argument, 0, OPT_BS},
        {"total", required_argument, 0, OPT_TOTAL}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *path = NULL;
    uint64_t bs = 0, total = 0;
    int c;
    while ((c = next_opt(argc, argv, lo)) != -1) {
        switch (c) {
        case OPT_PATH: path = optarg; break;
        case OPT_BS: bs = parse_u64("--bs", optarg, 1, 1ull << 30); break;
        case OPT_TOTAL: total = parse_u64("--total", optarg, 1, MAX_BYTES); break;
        }
    }
    REQUIRE(path, "--path"); REQUIRE(bs, "--bs"); REQUIRE(total, "--total");

    /* O_NONBLOCK so opening a serial port does not wait for carrier */
    int fd = open(path, O_WRONLY | O_CREAT | O_NOCTTY | O_CLOEXEC | O_NONBLOCK, 0644);
    if (fd < 0) die_rt("open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && ftruncate(fd, 0) < 0)
        die_rt("truncate %s: %s", path, strerror(errno));
    int tty = isatty(fd);
    struct termios saved, raw;
    int restore = 0;
    if (tty) {
        if (tcgetattr(fd, &saved) == 0) {
            raw = saved;
            cfmakeraw(&raw);
            raw.c_cflag |= CLOCAL | CREAD;
            cfsetispeed(&raw, B115200);
            cfsetospeed(&raw, B115200);
            if (tcsetattr(fd, TCSANOW, &raw) == 0) restore = 1;
            else fprintf(stderr, "vmbench write: tcsetattr %s: %s (continuing)\n", path, strerror(errno));
        } else {
            fprintf(stderr, "vmbench write: tcgetattr %s: %s (continuing)\n", path, strerror(errno));
        }
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);

    char *buf = malloc(bs);
    if (!buf) die_rt("cannot allocate %llu bytes", (unsigned long long)bs);
    for (uint64_t i = 0; i < bs; i++) buf[i] = (char)('a' + i % 26);

    cpu_mark c0, c1;
    cpu_mark_get(&c0);
    uint64_t t0 = now_ns(), left = total;
    while (left) {
        size_t n = left < bs ? left : bs, done = 0;
        while (done < n) {
            ssize_t r = write(fd, buf + done, n - done);
            if (r < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) { struct pollfd p = {fd, POLLOUT, 0}; poll(&p, 1, 100); continue; }
                die_rt("write %s: %s", path, strerror(errno));
            }
            done += (size_t)r;
        }
        left -= n;
    }
    if (tty && tcdrain(fd) < 0) fprintf(stderr, "vmbench write: tcdrain: %s\n", strerror(errno));
    uint64_t t1 = now_ns();
    cpu_mark_get(&c1);
    if (restore) tcsetattr(fd, TCSANOW, &saved);
    close(fd);
    free(buf);

    double secs = (t1 - t0) / 1e9;
    j_open(NULL);
    j_str("test", "write"); j_str("path", path); j_u64("bs", bs); j_u64("bytes", total);
    j_num("seconds", secs);
    j_num("throughput_mb_s", secs > 0 ? total / 1e6 / secs : 0);
    j_cpu_delta(&c0, &c1);
    j_close(); j_end();
    return 0;
}

/* ------------------------------------------------------------------ */
/* UDP                                                                  */

#define UDP_MAX 65507

static int udp_socket(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die_rt("socket: %s", strerror(errno));
    int sz = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    return fd;
}

static int udp_bound(uint64_t port)
{
    int fd = udp_socket(), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die_rt("bind port %llu: %s", (unsigned long long)port, strerror(errno));
    fputs("READY\n", stderr);
    fflush(stderr);
    return fd;
}

static void put_seq(unsigned char *p, uint64_t size, uint64_t seq)
{
    for (int i = 0; i < 8 && (uint64_t)i < size; i++) p[i] = (unsigned char)(seq >> (56 - 8 * i));
}
static int get_seq(const unsigned char *p, ssize_t len, uint64_t *seq)
{
    if (len < 8) return 0;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    *seq = v;
    return 1;
}

static int transient(int e)
{
    return e == ENOBUFS || e == EAGAIN || e == ENOMEM || e == EINTR || e == ECONNREFUSED;
}

/* common options for the udp subcommands */
struct udp_opts {
    const char *dst_s; struct in_addr dst;
    uint64_t port, size, count, rate, timeout_ms;
};

static void udp_parse(int argc, char **argv, struct udp_opts *o)
{
    enum { OPT_DST = 1, OPT_PORT, OPT_SIZE, OPT_COUNT, OPT_RATE, OPT_TMO };
    static const struct option lo[] = {
        {"dst", required_argument, 0, OPT_DST}, {"port", required_argument, 0, OPT_PORT},
        {"size", required_argument, 0, OPT_SIZE}, {"count", required_argument, 0, OPT_COUNT},
        {"rate-pps", required_argument, 0, OPT_RATE}, {"timeout-ms", required_argument, 0, OPT_TMO},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    while ((c = next_opt(argc, argv, lo)) != -1) {
        switch (c) {
        case OPT_DST: o->dst_s = optarg; o->dst = parse_ip("--dst", optarg); break;
        case OPT_PORT: o->port = parse_u64("--port", optarg, 1, 65535); break;
        case OPT_SIZE: o->size = parse_u64("--size", optarg, 1, UDP_MAX); break;
        case OPT_COUNT: o->count = parse_u64("--count", optarg, 1, MAX_COUNT); break;
        case OPT_RATE: o->rate = parse_u64("--rate-pps", optarg, 1, 100000000); break;
        case OPT_TMO: o->timeout_ms = parse_u64("--timeout-ms", optarg, 1, 86400000); break;
        }
    }
}

static void udp_reject(const struct udp_opts *o, int dst, int size, int rate)
{
    if (!dst && o->dst_s) die_usage("option --dst is not accepted here");
    if (!size && o->size) die_usage("option --size is not accepted here");
    if (!rate && o->rate) die_usage("option --rate-pps is not accepted here");
}

static int cmd_udp_send(int argc, char **argv)
{
    struct udp_opts o = {0};
    udp_parse(argc, argv, &o);
    udp_reject(&o, 1, 1, 1);
    if (o.timeout_ms) die_usage("option --timeout-ms is not accepted here");
    REQUIRE(o.dst_s, "--dst"); REQUIRE(o.port, "--port"); REQUIRE(o.size, "--size"); REQUIRE(o.count, "--count");
    int fd = udp_socket();
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)o.port), .sin_addr = o.dst };
    unsigned char *buf = calloc(1, o.size);
    if (!buf) die_rt("out of memory");
    for (uint64_t i = 8; i < o.size; i++) buf[i] = (unsigned char)('A' + i % 26);
    uint64_t errors = 0, consecutive = 0;
    uint64_t gap = o.rate ? 1000000000ull / o.rate : 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < o.count; i++) {
        if (gap) {
            uint64_t target = t0 + i * gap, t = now_ns();
            if (t < target) {
                if (target - t > 200000) sleep_ns(target - t - 100000);
                while (now_ns() < target) {}
            }
        }
        put_seq(buf, o.size, i);
        for (;;) {
            ssize_t r = sendto(fd, buf, o.size, 0, (struct sockaddr *)&a, sizeof a);
            if (r >= 0) { consecutive = 0; break; }
            if (!transient(errno)) die_rt("sendto %s:%llu: %s", o.dst_s, (unsigned long long)o.port, strerror(errno));
            errors++;
            if (++consecutive > 1000000) die_rt("sendto keeps failing: %s", strerror(errno));
            if (errno == ENOBUFS || errno == ENOMEM || errno == EAGAIN) {
                if (consecutive > 100) sleep_ns(50000); else sched_yield();
            }
        }
    }
    uint64_t t1 = now_ns();
    close(fd);
    free(buf);
    double secs = (t1 - t0) / 1e9;
    uint64_t bytes = o.count * o.size;
    j_open(NULL);
    j_str("test", "udp-send"); j_u64("size", o.size); j_u64("count", o.count); j_u64("bytes", bytes);
    j_num("seconds", secs);
    j_num("pps", secs > 0 ? o.count / secs : 0);
    j_num("throughput_mb_s", secs > 0 ? bytes / 1e6 / secs : 0);
    j_u64("errors", errors);
    j_close(); j_end();
    return 0;
}

/* wait until fd readable or deadline (ns, monotonic); 1 readable, 0 timeout */
static int wait_readable(int fd, uint64_t deadline)
{
    for (;;) {
        uint64_t t = now_ns();
        if (t >= deadline) return 0;
        uint64_t ms = (deadline - t + 999999) / 1000000;
        struct pollfd p = { fd, POLLIN, 0 };
        int r = poll(&p, 1, ms > INT_MAX ? INT_MAX : (int)ms);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) die_rt("poll: %s", strerror(errno));
    }
}

/* shared loop for udp-recv / udp-echo */
static int udp_sink(int echo, int argc, char **argv)
{
    struct udp_opts o = {0};
    udp_parse(argc, argv, &o);
    udp_reject(&o, 0, 0, 0);
    REQUIRE(o.port, "--port"); REQUIRE(o.count, "--count");
    if (!o.timeout_ms) o.timeout_ms = 2000;
    int fd = udp_bound(o.port);
    static unsigned char buf[65536];
    uint64_t got = 0, bytes = 0, first = 0, last = 0, tmo = o.timeout_ms * 1000000ull;
    uint64_t deadline = now_ns() + tmo;
    while (got < o.count && wait_readable(fd, deadline)) {
        while (got < o.count) {
            struct sockaddr_in src;
            socklen_t sl = sizeof src;
            ssize_t r = recvfrom(fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&src, &sl);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR || errno == ECONNREFUSED) break;
                die_rt("recvfrom: %s", strerror(errno));
            }
            last = now_ns();
            if (!got) first = last;
            got++;
            bytes += (uint64_t)r;
            if (echo) {
                while (sendto(fd, buf, (size_t)r, 0, (struct sockaddr *)&src, sl) < 0) {
                    if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) { sched_yield(); continue; }
                    fprintf(stderr, "vmbench udp-echo: sendto: %s\n", strerror(errno));
                    got--;
                    break;
                }
            }
        }
        deadline = now_ns() + tmo;
    }
    close(fd);
    j_open(NULL);
    if (echo) {
        j_str("test", "udp-echo"); j_u64("echoed", got);
    } else {
        double secs = got ? (last - first) / 1e9 : 0;
        j_str("test", "udp-recv"); j_u64("received", got); j_u64("bytes", bytes);
        j_num("seconds", secs);
        j_num("pps", secs > 0 ? got / secs : 0);
        j_num("throughput_mb_s", secs > 0 ? bytes / 1e6 / secs : 0);
        j_u64("lost", o.count - got);
    }
    j_close(); j_end();
    return 0;
}

static int cmd_udp_recv(int argc, char **argv) { return udp_sink(0, argc, argv); }
static int cmd_udp_echo(int argc, char **argv) { return udp_sink(1, argc, argv); }

static int cmd_udp_rr(int argc, char **argv)
{
    struct udp_opts o = {0};
    udp_parse(argc, argv, &o);
    udp_reject(&o, 1, 1, 0);
    REQUIRE(o.dst_s, "--dst"); REQUIRE(o.port, "--port"); REQUIRE(o.size, "--size"); REQUIRE(o.count, "--count");
    if (!o.timeout_ms) o.timeout_ms = 1000;
    if (o.count > (1ull << 26)) die_usage("invalid value for --count: at most 2^26 for udp-rr");
    int fd = udp_socket();
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)o.port), .sin_addr = o.dst };
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die_rt("connect %s: %s", o.dst_s, strerror(errno));
    unsigned char *buf = calloc(1, o.size);
    static unsigned char rbuf[65536];
    uint64_t *rtt = malloc(o.count * sizeof *rtt);
    if (!buf || !rtt) die_rt("out of memory");
    for (uint64_t i = 8; i < o.size; i++) buf[i] = (unsigned char)('a' + i % 26);
    uint64_t replies = 0, tmo = o.timeout_ms * 1000000ull;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < o.count; i++) {
        put_seq(buf, o.size, i);
        uint64_t s = now_ns();
        if (send(fd, buf, o.size, 0) < 0) {
            if (!transient(errno)) die_rt("send: %s", strerror(errno));
            continue;
        }
        uint64_t deadline = s + tmo;
        while (wait_readable(fd, deadline)) {
            ssize_t r = recv(fd, rbuf, sizeof rbuf, MSG_DONTWAIT);
            uint64_t e = now_ns();
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                if (errno == ECONNREFUSED) break;     /* nobody listening: no reply */
                die_rt("recv: %s", strerror(errno));
            }
            uint64_t seq;
            if (o.size >= 8 && get_seq(rbuf, r, &seq) && seq < i) continue;   /* stale */
            rtt[replies++] = e - s;
            break;
        }
    }
    uint64_t t1 = now_ns();
    close(fd);
    qsort(rtt, replies, sizeof *rtt, cmp_u64);
    j_open(NULL);
    j_str("test", "udp-rr"); j_u64("size", o.size); j_u64("count", o.count); j_u64("replies", replies);
    if (replies) {
        j_num("rtt_us_median", pct_u64(rtt, replies, 0.5) / 1e3);
        j_num("rtt_us_p99", pct_u64(rtt, replies, 0.99) / 1e3);
        j_num("rtt_us_min", rtt[0] / 1e3);
    } else {
        j_null("rtt_us_median"); j_null("rtt_us_p99"); j_null("rtt_us_min");
    }
    j_num("seconds", (t1 - t0) / 1e9);
    j_close(); j_end();
    free(rtt); free(buf);
    return 0;
}

/* ------------------------------------------------------------------ */
/* cpu nano-benchmarks                                                  */

static volatile uint64_t g_sink;
static size_t g_page;

typedef struct {
    void *p;            /* mapping (mprotect) / src buffer (memory_bw) */
    void *q;            /* dst buffer (memory_bw) */
    size_t len;
    struct sigaction old;
} bctx;

static void *map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die_rt("mmap %zu bytes: %s", len, strerror(errno));
    return p;
}

/* null_syscall */
static void b_null_syscall(bctx *c, uint64_t n)
{
    (void)c;
    for (uint64_t i = 0; i < n; i++) syscall(SYS_getppid);
}

/* page_fault: chunks of up to 4096 pages */
static void b_page_fault(bctx *c, uint64_t n)
{
    (void)c;
    while (n) {
        uint64_t k = n < 4096 ? n : 4096;
        size_t len = k * g_page;
        volatile char *p = map_anon(len);
#ifdef MADV_NOHUGEPAGE
        madvise((void *)p, len, MADV_NOHUGEPAGE);
#endif
        for (uint64_t i = 0; i < k; i++) p[i * g_page] = 1;
        munmap((void *)p, len);
        n -= k;
    }
}

/* port_io */
static int s_port_io(bctx *c, char *why, size_t wl)
{
    (void)c;
#if HAVE_X86
    if (ioperm(0x80, 1, 1) < 0) {
        int e = errno;
        snprintf(why, wl, "ioperm: %s (%s)", strerror(e),
                 e == ENOSYS ? "kernel built without CONFIG_X86_IOPL_IOPERM" : "needs root");
        return -1;
    }
    return 0;
#else
    snprintf(why, wl, "not x86");
    return -1;
#endif
}
static void b_port_io(bctx *c, uint64_t n)
{
    (void)c;
#if HAVE_X86
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t v;
        __asm__ __volatile__("inb %w1, %b0" : "=a"(v) : "Nd"((uint16_t)0x80));
        acc += v;
    }
    g_sink = acc;
#endif
}
static void t_port_io(bctx *c)
{
    (void)c;
#if HAVE_X86
    ioperm(0x80, 1, 0);
#endif
}

/* signal_fpe */
static sigjmp_buf g_fpe_env;
static void fpe_handler(int sig) { (void)sig; siglongjmp(g_fpe_env, 1); }
static int s_signal_fpe(bctx *c, char *why, size_t wl)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fpe_handler;
    sa.sa_flags = SA_NODEFER;          /* no mask change, so no mask to restore */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGFPE, &sa, &c->old) < 0) { snprintf(why, wl, "sigaction: %s", strerror(errno)); return -1; }
    return 0;
}
static void b_signal_fpe(bctx *c, uint64_t n)
{
    (void)c;
    static volatile int num = 42, zero = 0;
    volatile int res __attribute__((unused));
    for (volatile uint64_t i = 0; i < n; i++) {
        if (sigsetjmp(g_fpe_env, 0) == 0) {
            res = num / zero;
            die_rt("division by zero did not trap");
        }
    }
}
static void t_signal_fpe(bctx *c) { sigaction(SIGFPE, &c->old, NULL); }

/* mprotect */
static int s_mprotect(bctx *c, char *why, size_t wl)
{
    (void)why; (void)wl;
    c->len = g_page;
    c->p = map_anon(c->len);
    *(volatile char *)c->p = 1;
    return 0;
}
static void b_mprotect(bctx *c, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (mprotect(c->p, c->len, (i & 1) ? PROT_READ | PROT_WRITE : PROT_READ) < 0)
            die_rt("mprotect: %s", strerror(errno));
    mprotect(c->p, c->len, PROT_READ | PROT_WRITE);
}
static void t_unmap(bctx *c)
{
    if (c->p) munmap(c->p, c->len);
    if (c->q) munmap(c->q, c->len);
}

/* mmap_munmap */
static void b_mmap_munmap(bctx *c, uint64_t n)
{
    (void)c;
    for (uint64_t i = 0; i < n; i++) {
        volatile char *p = map_anon(g_page);
        p[0] = 1;
        munmap((void *)p, g_page);
    }
}

/* clock_gettime */
static void b_clock_gettime(bctx *c, uint64_t n)
{
    (void)c;
    uint64_t acc = 0;
    struct timespec ts;
    for (uint64_t i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        acc += (uint64_t)ts.tv_nsec;
    }
    g_sink = acc;
}

/* rdtsc */
static void b_rdtsc(bctx *c, uint64_t n)
{
    (void)c;
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++) acc += rdtsc();
    g_sink = acc;
}

/* compute */
static uint64_t compute_loop(uint64_t n, uint64_t x)
{
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        acc += x * 0x9E3779B97F4A7C15ull + (acc >> 3);
    }
    return acc ^ x;
}
static void b_compute(bctx *c, uint64_t n) { (void)c; g_sink = compute_loop(n, g_sink | 1); }

/* memory_bw: iterations = 4 KiB blocks copied, wrapping over the buffer */
static double g_scale = 1.0;
static int s_memory_bw(bctx *c, char *why, size_t wl)
{
    (void)why; (void)wl;
    /* 32 MiB (8192 blocks) scaled by --scale (at most 1), at least 1 MiB */
    uint64_t blocks = (uint64_t)(8192 * (g_scale < 1 ? g_scale : 1));
    if (blocks < 256) blocks = 256;
    c->len = blocks * 4096;
    c->p = map_anon(c->len);
    c->q = map_anon(c->len);
    memset(c->p, 0x5a, c->len);
    memset(c->q, 0, c->len);
    return 0;
}
static void b_memory_bw(bctx *c, uint64_t n)
{
    uint64_t per = c->len / 4096;
    while (n) {
        uint64_t k = n < per ? n : per;
        memcpy(c->q, c->p, k * 4096);
        __asm__ __volatile__("" ::: "memory");
        n -= k;
    }
    g_sink = ((volatile char *)c->q)[0];
}

/* fork_wait */
static void b_fork_wait(bctx *c, uint64_t n)
{
    (void)c;
    for (uint64_t i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) die_rt("fork: %s", strerror(errno));
        if (p == 0) _exit(0);
        int st;
        while (waitpid(p, &st, 0) < 0 && errno == EINTR) {}
    }
}

typedef struct {
    const char *name;
    uint64_t base;                       /* iterations at --scale 1 */
    uint64_t min;
    int (*setup)(bctx *, char *, size_t);
    void (*run)(bctx *, uint64_t);
    void (*teardown)(bctx *);
} bench_t;

static const bench_t benches[] = {
    {"null_syscall",  300000,   100, NULL, b_null_syscall, NULL},
    {"page_fault",     65536,    16, NULL, b_page_fault, NULL},
    {"port_io",        20000,    10, s_port_io, b_port_io, t_port_io},
    {"signal_fpe",     30000,    10, s_signal_fpe, b_signal_fpe, t_signal_fpe},
    {"mprotect",      100000,   100, s_mprotect, b_mprotect, t_unmap},
    {"mmap_munmap",    10000,    10, NULL, b_mmap_munmap, NULL},
    {"clock_gettime", 2000000, 1000, NULL, b_clock_gettime, NULL},
    {"rdtsc",         3000000, 1000, NULL, b_rdtsc, NULL},
    {"compute",      30000000, 1000, NULL, b_compute, NULL},
    {"memory_bw",     262144,   256, s_memory_bw, b_memory_bw, t_unmap},
    {"fork_wait",        500,     2, NULL, b_fork_wait, NULL},
};
#define NBENCH (sizeof benches / sizeof benches[0])

static int cmd_cpu(int argc, char **argv)
{
    enum { OPT_BENCH = 1, OPT_REP, OPT_SCALE };
    static const struct option lo[] = {
        {"bench", required_argument, 0, OPT_BENCH}, {"repeats", required_argument, 0, OPT_REP},
        {"scale", required_argument, 0, OPT_SCALE}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int sel[NBENCH], any = 0, c;
    memset(sel, 0, sizeof sel);
    uint64_t repeats = 5;
    double scale = 1.0;
    while ((c = next_opt(argc, argv, lo)) != -1) {
        switch (c) {
        case OPT_BENCH: {
            char *s = strdup(optarg), *save = NULL;
            if (!s) die_rt("out of memory");
            for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                size_t k;
                for (k = 0; k < NBENCH; k++) if (!strcmp(t, benches[k].name)) break;
                if (k == NBENCH) die_usage("invalid value for --bench: unknown benchmark '%s'", t);
                sel[k] = 1; any = 1;
            }
            if (!any) die_usage("invalid value for --bench: '%s' (no benchmark named)", optarg);
            free(s);
            break;
        }
        case OPT_REP: repeats = parse_u64("--repeats", optarg, 1, 1000); break;
        case OPT_SCALE: scale = parse_dbl("--scale", optarg, 1e-9, 1000); break;
        }
    }
    if (scale <= 0) die_usage("invalid value for --scale: must be > 0");
    if (!any) for (size_t k = 0; k < NBENCH; k++) sel[k] = 1;
    g_scale = scale;
    g_page = (size_t)sysconf(_SC_PAGESIZE);

    double *samples = malloc(repeats * sizeof *samples), *cyc = malloc(repeats * sizeof *cyc);
    if (!samples || !cyc) die_rt("out of memory");
    char cs[128];
    int have_cs = read_small("/sys/devices/system/clocksource/clocksource0/current_clocksource", cs, sizeof cs) == 0;

    /* measure everything first, print at the end so output is one line */
    struct res { int skipped; char why[160]; uint64_t iters; double s[1000], cy; } *res = calloc(NBENCH, sizeof *res);
    if (!res) die_rt("out of memory");
    for (size_t k = 0; k < NBENCH; k++) {
        if (!sel[k]) continue;
        const bench_t *b = &benches[k];
        uint64_t iters = (uint64_t)((double)b->base * scale + 0.5);
        if (iters < b->min) iters = b->min;
        res[k].iters = iters;
        bctx ctx;
        memset(&ctx, 0, sizeof ctx);
        if (b->setup && b->setup(&ctx, res[k].why, sizeof res[k].why) != 0) { res[k].skipped = 1; continue; }
        uint64_t warm = iters / 10 ? iters / 10 : 1;
        b->run(&ctx, warm);
        for (uint64_t r = 0; r < repeats; r++) {
            uint64_t c0 = rdtsc(), t0 = now_ns();
            b->run(&ctx, iters);
            uint64_t t1 = now_ns(), c1 = rdtsc();
            samples[r] = (double)(t1 - t0) / (double)iters;
            cyc[r] = (double)(c1 - c0) / (double)iters;
        }
        if (b->teardown) b->teardown(&ctx);
        memcpy(res[k].s, samples, repeats * sizeof *samples);
        res[k].cy = median_dbl(cyc, repeats);
    }

    j_open(NULL);
    j_str("test", "cpu");
    j_aopen("results");
    for (size_t k = 0; k < NBENCH; k++) {
        if (!sel[k]) continue;
        const bench_t *b = &benches[k];
        j_open(NULL);
        j_str("benchmark", b->name);
        if (res[k].skipped) { j_str("skipped", res[k].why); j_close(); continue; }
        double *s = res[k].s, mn = s[0], mx = s[0], sum = 0, var = 0;
        for (uint64_t r = 0; r < repeats; r++) { if (s[r] < mn) mn = s[r]; if (s[r] > mx) mx = s[r]; sum += s[r]; }
        double mean = sum / repeats;
        for (uint64_t r = 0; r < repeats; r++) var += (s[r] - mean) * (s[r] - mean);
        double sd = repeats > 1 ? my_sqrt(var / (repeats - 1)) : 0;
        double med = median_dbl(s, repeats);
        j_u64("iterations", res[k].iters);
        j_u64("repeats", repeats);
        j_num("ns_per_op", med);
        j_num("ns_min", mn);
        j_num("ns_max", mx);
        j_num("ns_cv", mean > 0 ? sd / mean : 0);
        if (HAVE_X86) j_num("cycles_per_op", res[k].cy); else j_null("cycles_per_op");
        if (!strcmp(b->name, "clock_gettime")) j_str("clocksource", have_cs ? cs : NULL);
        if (!strcmp(b->name, "memory_bw")) j_num("mb_s", med > 0 ? 4096.0 / med * 1e3 : 0);
        j_aopen("samples_ns");
        for (uint64_t r = 0; r < repeats; r++) j_num(NULL, s[r]);
        j_aclose();
        j_close();
    }
    j_aclose();
    j_close(); j_end();
    free(res); free(samples); free(cyc);
    return 0;
}

/* ------------------------------------------------------------------ */
/* spin                                                                 */

static int read_steal(uint64_t *steal)
{
    char buf[512];
    if (read_small("/proc/stat", buf, sizeof buf) < 0) return -1;
    unsigned long long v[8];
    if (strncmp(buf, "cpu ", 4) != 0) return -1;
    if (sscanf(buf + 4, "%llu %llu %llu %llu %llu %llu %llu %llu",
               &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) != 8) return -1;
    *steal = v[7];
    return 0;
}

static int cmd_spin(int argc, char **argv)
{
    static const struct option lo[] = {
        {"seconds", required_argument, 0, 1}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    double secs = 0;
    int c;
    while ((c = next_opt(argc, argv, lo)) != -1)
        if (c == 1) secs = parse_dbl("--seconds", optarg, 1e-6, 86400 * 30);
    REQUIRE(secs > 0, "--seconds");
    uint64_t st0 = 0, st1 = 0;
    int steal_ok = read_steal(&st0) == 0;
    cpu_mark c0, c1;
    cpu_mark_get(&c0);
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), t, ops = 0, x = 88172645463325252ull;
    do {
        x = compute_loop(1u << 20, x) | 1;
        ops += 1u << 20;
        t = now_ns();
    } while (t < end);
    cpu_mark_get(&c1);
    g_sink = x;
    if (steal_ok) steal_ok = read_steal(&st1) == 0;
    double el = (t - t0) / 1e9;
    j_open(NULL);
    j_str("test", "spin"); j_num("seconds", el); j_u64("ops", ops);
    j_num("ops_per_s", el > 0 ? ops / el : 0);
    j_cpu_delta(&c0, &c1);
    if (steal_ok) j_i64("steal_ticks", (int64_t)(st1 - st0)); else j_null("steal_ticks");
    j_close(); j_end();
    return 0;
}

/* ------------------------------------------------------------------ */
/* touch                                                                */

static int cmd_touch(int argc, char **argv)
{
    static const struct option lo[] = {
        {"mb", required_argument, 0, 1}, {"hold-ms", required_argument, 0, 2},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    uint64_t mb = 0, hold = 0;
    int c;
    while ((c = next_opt(argc, argv, lo)) != -1) {
        if (c == 1) mb = parse_u64("--mb", optarg, 1, 1ull << 22);
        if (c == 2) hold = parse_u64("--hold-ms", optarg, 0, 86400000ull * 7);
    }
    REQUIRE(mb, "--mb");
    size_t page = (size_t)sysconf(_SC_PAGESIZE), len = (size_t)mb << 20;
    uint64_t t0 = now_ns();
    volatile char *p = map_anon(len);
    for (size_t off = 0; off < len; off += page) p[off] = 1;
    uint64_t t1 = now_ns();
    double secs = (t1 - t0) / 1e9;
    j_open(NULL);
    j_str("test", "touch"); j_u64("mb", mb); j_num("seconds", secs);
    j_num("mb_s", secs > 0 ? mb * 1.048576 / secs : 0);
    j_close(); j_end();
    if (hold) sleep_ns(hold * 1000000ull);
    munmap((void *)p, len);
    return 0;
}

/* ------------------------------------------------------------------ */
/* sysinfo                                                              */

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
#if HAVE_X86
    __cpuid_count(leaf, 0, *a, *b, *c, *d);
#else
    (void)leaf; *a = *b = *c = *d = 0;
#endif
}

static void regs_str(char *out, const uint32_t *regs, int n)
{
    memcpy(out, regs, 4 * (size_t)n);
    out[4 * n] = 0;
    for (int i = 0; i < 4 * n; i++)
        if (out[i] && ((unsigned char)out[i] < 0x20 || (unsigned char)out[i] > 0x7e)) out[i] = '?';
}

static int cmd_sysinfo(int argc, char **argv)
{
    static const struct option lo[] = {{"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    while (next_opt(argc, argv, lo) != -1) {}
    uint32_t a, b, c, d, r[12];
    char vendor[13], hv[13], brand[49];
    cpuid(0, &a, &b, &c, &d);
    uint32_t maxleaf = a;
    r[0] = b; r[1] = d; r[2] = c;
    regs_str(vendor, r, 3);
    int hvbit = 0;
    if (maxleaf >= 1) { cpuid(1, &a, &b, &c, &d); hvbit = (c >> 31) & 1; }
    uint32_t hvmax = 0;
    if (hvbit) {
        cpuid(0x40000000, &a, &b, &c, &d);
        hvmax = a; r[0] = b; r[1] = c; r[2] = d;
        regs_str(hv, r, 3);
    }
    int have_brand = 0;
    cpuid(0x80000000, &a, &b, &c, &d);
    if (a >= 0x80000004) {
        for (uint32_t i = 0; i < 3; i++) cpuid(0x80000002 + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
        regs_str(brand, r, 12);
        char *s = brand;
        while (*s == ' ') s++;
        memmove(brand, s, strlen(s) + 1);
        size_t n = strlen(brand);
        while (n && brand[n - 1] == ' ') brand[--n] = 0;
        have_brand = 1;
    }
    char cur[128], avail[512];
    int have_cur = read_small("/sys/devices/system/clocksource/clocksource0/current_clocksource", cur, sizeof cur) == 0;
    int have_avail = read_small("/sys/devices/system/clocksource/clocksource0/available_clocksource", avail, sizeof avail) == 0;
    long long memkb = -1;
    FILE *f = fopen("/proc/meminfo", "re");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemTotal: %lld kB", &memkb) == 1) break;
        fclose(f);
    }
    j_open(NULL);
    j_str("test", "sysinfo");
    j_bool("hypervisor_bit", hvbit);
    j_str("hypervisor_vendor", hvbit ? hv : NULL);
    if (hvbit) j_u64("hypervisor_max_leaf", hvmax); else j_null("hypervisor_max_leaf");
    j_str("cpu_vendor", HAVE_X86 ? vendor : NULL);
    j_str("cpu_brand", have_brand ? brand : NULL);
    j_str("clocksource_current", have_cur ? cur : NULL);
    j_aopen("clocksources_available");
    if (have_avail) {
        char *save = NULL;
        for (char *t = strtok_r(avail, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) j_str(NULL, t);
    }
    j_aclose();
    j_i64("nproc", sysconf(_SC_NPROCESSORS_ONLN));
    if (memkb >= 0) j_i64("mem_total_kb", memkb); else j_null("mem_total_kb");
    j_close(); j_end();
    return 0;
}

/* ------------------------------------------------------------------ */
/* dirty: memory-dirtying workload with a heartbeat (live migration)    */

static volatile sig_atomic_t g_stop;
static void on_stop(int sig) { (void)sig; g_stop = 1; }

static void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)(v & 0xff); v >>= 8; }
}

static int cmd_dirty(int argc, char **argv)
{
    enum { OPT_MB = 1, OPT_RATE, OPT_SECS, OPT_BEAT, OPT_DST, OPT_PORT, OPT_CTR };
    static const struct option lo[] = {
        {"mb", required_argument, 0, OPT_MB}, {"rate-mbs", required_argument, 0, OPT_RATE},
        {"seconds", required_argument, 0, OPT_SECS}, {"beat-ms", required_argument, 0, OPT_BEAT},
        {"dst", required_argument, 0, OPT_DST}, {"port", required_argument, 0, OPT_PORT},
        {"counter", required_argument, 0, OPT_CTR}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    uint64_t mb = 0, beat_ms = 5, port = 0;
    double rate = -1, secs = 0;
    const char *dst_s = NULL, *ctr = NULL;
    struct in_addr dst = {0};
    int c;
    while ((c = next_opt(argc, argv, lo)) != -1) {
        switch (c) {
        case OPT_MB: mb = parse_u64("--mb", optarg, 1, 1ull << 20); break;
        case OPT_RATE: rate = parse_dbl("--rate-mbs", optarg, 0, 1e6); break;
        case OPT_SECS: secs = parse_dbl("--seconds", optarg, 0, 86400 * 30); break;
        case OPT_BEAT: beat_ms = parse_u64("--beat-ms", optarg, 1, 60000); break;
        case OPT_DST: dst_s = optarg; dst = parse_ip("--dst", optarg); break;
        case OPT_PORT: port = parse_u64("--port", optarg, 1, 65535); break;
        case OPT_CTR: ctr = optarg; break;
        }
    }
    REQUIRE(mb, "--mb");
    REQUIRE(rate >= 0, "--rate-mbs");
    if (!dst_s != !port) die_usage("--dst and --port go together");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    size_t page = 4096, len = (size_t)mb << 20, npages = len / page;
    uint64_t *p = map_anon(len);
    madvise(p, len, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < npages; i++) p[i * (page / 8)] = 1;
    int fd = -1, cfd = -1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr = dst };
    if (dst_s) fd = udp_socket();
    if (ctr) {
        cfd = open(ctr, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (cfd < 0) die_rt("open %s: %s", ctr, strerror(errno));
    }
    int unpaced = rate >= 100000;
    double per_ns = rate * 256.0 / 1e9;            /* pages per ns */
    double credit = 0, cap = per_ns * 10e6;        /* at most 10 ms of work in one burst */
    uint64_t beat_ns = beat_ms * 1000000ull, written = 0, beats = 0, errors = 0, value = 1, max_gap = 0;
    size_t idx = 0;
    uint64_t t0 = now_ns(), end = secs > 0 ? t0 + (uint64_t)(secs * 1e9) : UINT64_MAX;
    uint64_t last = t0, next_beat = t0, prev_beat = 0;
    unsigned char msg[28];
    memcpy(msg, "VMHB", 4);
    while (!g_stop) {
        uint64_t t = now_ns();
        if (t >= end) break;
        if (t >= next_beat) {
            if (prev_beat && t - prev_beat > max_gap) max_gap = t - prev_beat;
            prev_beat = t;
            beats++;
            put_be64(msg + 4, beats); put_be64(msg + 12, t); put_be64(msg + 20, written);
            if (fd >= 0 && sendto(fd, msg, sizeof msg, 0, (struct sockaddr *)&a, sizeof a) < 0) errors++;
            if (cfd >= 0) {
                char num[32];
                int n = snprintf(num, sizeof num, "%llu\n", (unsigned long long)beats);
                if (pwrite(cfd, num, (size_t)n, 0) < 0) errors++;
            }
            next_beat += beat_ns;
            if (next_beat <= t) next_beat = t + beat_ns;
        }
        uint64_t todo;
        if (unpaced) todo = 256;
        else {
            credit += (double)(t - last) * per_ns;
            if (credit > cap && cap > 0) credit = cap;
            todo = credit >= 1 ? (uint64_t)credit : 0;
            if (todo > 256) todo = 256;
            credit -= (double)todo;
        }
        last = t;
        if (rate > 0 && todo) {
            for (uint64_t k = 0; k < todo; k++) {
                p[idx * (page / 8)] = ++value;
                if (++idx == npages) idx = 0;
            }
            written += todo;
            continue;
        }
        /* nothing due: sleep until the next beat or the next page, at most 1 ms */
        uint64_t wait = next_beat > t ? next_beat - t : 0;
        if (rate > 0 && !unpaced) {
            uint64_t page_due = (uint64_t)((1.0 - credit) / per_ns);
            if (page_due < wait) wait = page_due;
        }
        if (wait > 1000000) wait = 1000000;
        if (wait > 20000) sleep_ns(wait);
    }
    uint64_t t1 = now_ns();
    /* every page holds the value of its last write: walking back from the last page written, the
       values must go down by one per page; a page that does not hold its value lost a write */
    uint64_t checked = written < npages ? written : npages, stale = 0;
    for (uint64_t k = 0; k < checked; k++) {
        size_t j = (idx + npages - 1 - (size_t)(k % npages)) % npages;
        if (p[j * (page / 8)] != value - k) stale++;
    }
    if (fd >= 0) close(fd);
    if (cfd >= 0) close(cfd);
    munmap(p, len);
    double el = (t1 - t0) / 1e9;
    j_open(NULL);
    j_str("test", "dirty"); j_u64("mb", mb); j_num("rate_mbs", rate); j_num("seconds", el);
    j_u64("pages_written", written);
    j_num("achieved_mbs", el > 0 ? written / 256.0 / el : 0);
    j_u64("beats", beats); j_u64("beat_ms", beat_ms); j_num("max_gap_ms", max_gap / 1e6);
    j_u64("send_errors", errors); j_u64("pages_checked", checked); j_u64("stale_pages", stale);
    j_close(); j_end();
    return 0;
}

/* ------------------------------------------------------------------ */

static const struct { const char *name; int (*fn)(int, char **); } cmds[] = {
    {"disk", cmd_disk}, {"write", cmd_write}, {"udp-send", cmd_udp_send},
    {"udp-recv", cmd_udp_recv}, {"udp-rr", cmd_udp_rr}, {"udp-echo", cmd_udp_echo},
    {"cpu", cmd_cpu}, {"spin", cmd_spin}, {"touch", cmd_touch}, {"sysinfo", cmd_sysinfo},
    {"dirty", cmd_dirty},
};

int main(int argc, char **argv)
{
    if (argc < 2) { fputs(usage_text, stderr); return 2; }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(usage_text, stdout);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        if (!strcmp(argv[1], cmds[i].name)) {
            g_sub = cmds[i].name;
            opterr = 0;
            optind = 1;
            return cmds[i].fn(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "vmbench: unknown subcommand '%s' (see vmbench --help)\n", argv[1]);
    return 2;
}
