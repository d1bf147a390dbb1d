/* bench_c.c -- the C core's allocate+free pair beside glibc malloc+free, with no Python at all.
 * Built by stress/bench_c.py with the core's release flags (-O2 -DNDEBUG -DSHMALLOC_DEBUG=0).
 *
 *   bench_c pairs ITERS TRIALS SIZE...   ITERS shm_alloc/shm_free pairs and ITERS malloc/free
 *       pairs per size, TRIALS times, interleaved, on its own arena (a segment unlinked at once,
 *       so nothing is left behind); prints ns per pair of every trial as JSON.
 *   bench_c scale NPROCS ITERS SIZE      NPROCS forked processes, each with its own slot, time
 *       ITERS core pairs at once on the one arena, then MALLOC_X*ITERS malloc pairs on private
 *       heaps; prints the aggregate pairs per second of both as JSON.
 *   bench_c replay FILE                  replays a trace of 16-byte records (uint32 op: 1
 *       allocate, 2 free; uint32 id; uint64 size) through glibc with M_TOP_PAD 0; prints the
 *       peak requested live bytes and the peak footprint (mallinfo2 arena + mmapped bytes,
 *       sampled at every new live peak and every 16 events, less what was in use before).
 *
 * A failure prints a message on stderr and exits with status 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shm_internal.h"

#define SEGMENT_BYTES ((uint64_t)1 << 30) /* reserved lazily by the core (fallocate) */
#define MAX_SIZES 16
#define MAX_TRIALS 101
#define MALLOC_X 20 /* scale: malloc pairs are ~20x faster; time as long a run for them */

static void die(const char *what) {
    fprintf(stderr, "bench_c: %s\n", what);
    exit(1);
}

static void die_shm(const char *what, int64_t status) {
    const shm_error_info_t *e = shm_last_error();
    fprintf(stderr, "bench_c: %s failed: %s (%lld): %s\n", what, shm_strerror((int)status),
            (long long)status, e ? e->detail : "");
    exit(1);
}

static uint64_t clock_ns(clockid_t which) {
    struct timespec ts;
    clock_gettime(which, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#define now_ns() clock_ns(CLOCK_MONOTONIC)

/* The start time that tells a recycled pid apart is only read by whoever collects dead processes'
 * memory; nobody does on these private arenas, so each slot is claimed with start time 0. */
#define START_TIME 0

/* An arena in a fresh POSIX shared-memory segment that is already unlinked. */
static shm_handle_t *make_arena(int32_t *slot_out) {
    char name[64];
    snprintf(name, sizeof name, "/shmalloc-benchc-%d", (int)getpid());
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) die("shm_open");
    shm_unlink(name); /* the mapping and the descriptor keep it alive; nothing to clean up */
    if (ftruncate(fd, (off_t)SEGMENT_BYTES) != 0) die("ftruncate");
    void *base = mmap(NULL, SEGMENT_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) die("mmap");
    int rc = shm_arena_format(base, SEGMENT_BYTES, fd, 0x9e3779b97f4a7c15ull ^ now_ns(),
                              clock_ns(CLOCK_REALTIME));
    if (rc != SHM_OK) die_shm("shm_arena_format", rc);
    shm_handle_t *h = NULL;
    rc = shm_handle_open(base, SEGMENT_BYTES, fd, &h);
    if (rc != SHM_OK) die_shm("shm_handle_open", rc);
    int slot = shm_proc_attach(h, (uint32_t)getpid(), START_TIME);
    if (slot < 0) die_shm("shm_proc_attach", slot);
    *slot_out = slot;
    return h;
}

/* Keeps the compiler from eliding or merging an allocate/free pair. */
#define KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")

static double time_core(shm_handle_t *h, int32_t slot, uint64_t size, long iters) {
    uint64_t t0 = now_ns();
    for (long i = 0; i < iters; i++) {
        int64_t r = shm_alloc(h, size, 0, slot);
        if (r < 0) die_shm("shm_alloc", r);
        KEEP(r);
        int64_t f = shm_free(h, (uint64_t)r & SHM_ALLOC_ADDRESS_MASK);
        if (f < 0) die_shm("shm_free", f);
    }
    return (double)(now_ns() - t0) / (double)iters;
}

static double time_malloc(uint64_t size, long iters) {
    uint64_t t0 = now_ns();
    for (long i = 0; i < iters; i++) {
        void *p = malloc(size);
        if (!p) die("malloc");
        KEEP(p);
        free(p);
    }
    return (double)(now_ns() - t0) / (double)iters;
}

static void print_trials(const char *key, const double *v, int n, int last) {
    printf("    \"%s\": [", key);
    for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", v[i]);
    printf("]%s\n", last ? "" : ",");
}

static int cmd_pairs(int argc, char **argv) {
    if (argc < 3) die("usage: bench_c pairs ITERS TRIALS SIZE...");
    long iters = atol(argv[0]);
    int trials = atoi(argv[1]);
    int nsizes = argc - 2;
    if (iters < 1 || trials < 1 || trials > MAX_TRIALS || nsizes > MAX_SIZES) die("bad arguments");
    uint64_t sizes[MAX_SIZES];
    for (int i = 0; i < nsizes; i++) sizes[i] = strtoull(argv[2 + i], NULL, 10);

    int32_t slot;
    shm_handle_t *h = make_arena(&slot);
    static double core[MAX_SIZES][MAX_TRIALS], libc[MAX_SIZES][MAX_TRIALS];
    for (int s = 0; s < nsizes; s++) { /* warm-up: pages reserved, caches and tcache primed */
        time_core(h, slot, sizes[s], iters / 10 + 1);
        time_malloc(sizes[s], iters / 10 + 1);
    }
    for (int t = 0; t < trials; t++) {
        for (int s = 0; s < nsizes; s++) {
            if (t % 2) libc[s][t] = time_malloc(sizes[s], iters); /* odd trials: glibc first */
            core[s][t] = time_core(h, slot, sizes[s], iters);
            if (t % 2 == 0) libc[s][t] = time_malloc(sizes[s], iters);
        }
    }
    shm_stats_t st;
    shm_stats_read(h, &st);
    if (st.allocated_blocks != 0) die("the core pairs left blocks allocated");

    printf("{\n  \"iters\": %ld,\n  \"trials\": %d,\n  \"sizes\": {\n", iters, trials);
    for (int s = 0; s < nsizes; s++) {
        printf("   \"%llu\": {\n", (unsigned long long)sizes[s]);
        print_trials("core", core[s], trials, 0);
        print_trials("glibc", libc[s], trials, 1);
        printf("   }%s\n", s + 1 < nsizes ? "," : "");
    }
    printf("  }\n}\n");
    shm_handle_close(h);
    return 0;
}

/* One child of cmd_scale: wait for the go byte, time the pairs, report ns elapsed. */
static void scale_child(shm_handle_t *h, int shared, uint64_t size, long iters, int go_fd,
                        int out_fd) {
    int32_t slot = -1;
    if (shared) {
        slot = shm_proc_attach(h, (uint32_t)getpid(), START_TIME);
        if (slot < 0) die_shm("shm_proc_attach (child)", slot);
    }
    char c;
    if (read(go_fd, &c, 1) != 1) die("read go");
    uint64_t t0 = now_ns();
    (void)(shared ? time_core(h, slot, size, iters) : time_malloc(size, iters * MALLOC_X));
    uint64_t t1 = now_ns();
    uint64_t rep[2] = {t0, t1};
    if (write(out_fd, rep, sizeof rep) != (ssize_t)sizeof rep) die("write result");
    _exit(0);
}

/* Aggregate pairs per second of nprocs children running at once (shared arena or malloc). */
static double scale_run(shm_handle_t *h, int shared, int nprocs, uint64_t size, long iters) {
    int go[2], out[2];
    if (pipe(go) || pipe(out)) die("pipe");
    pid_t pids[64];
    for (int i = 0; i < nprocs; i++) {
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            close(go[1]);
            close(out[0]);
            scale_child(h, shared, size, iters, go[0], out[1]);
        }
        pids[i] = pid;
    }
    close(go[0]);
    close(out[1]);
    usleep(50000); /* let every child reach its read */
    char gobytes[64] = {0};
    if (write(go[1], gobytes, (size_t)nprocs & 63u ? (size_t)nprocs : 64u) != nprocs)
        die("write go");
    uint64_t first = UINT64_MAX, last = 0;
    for (int i = 0; i < nprocs; i++) {
        uint64_t rep[2];
        if (read(out[0], rep, sizeof rep) != (ssize_t)sizeof rep) die("a child failed");
        if (rep[0] < first) first = rep[0];
        if (rep[1] > last) last = rep[1];
    }
    for (int i = 0; i < nprocs; i++) {
        int st;
        waitpid(pids[i], &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) die("a child exited abnormally");
    }
    close(go[1]);
    close(out[0]);
    long done = shared ? iters : iters * MALLOC_X;
    return (double)nprocs * (double)done / ((double)(last - first) / 1e9);
}

static int cmd_scale(int argc, char **argv) {
    if (argc < 3) die("usage: bench_c scale NPROCS ITERS SIZE");
    int nprocs = atoi(argv[0]);
    long iters = atol(argv[1]);
    uint64_t size = strtoull(argv[2], NULL, 10);
    if (nprocs < 1 || nprocs > 64 || iters < 1 || size < 1) die("bad arguments");
    int32_t slot;
    shm_handle_t *h = make_arena(&slot);
    time_core(h, slot, size, iters / 10 + 1); /* reserve the pages once */
    double core = scale_run(h, 1, nprocs, size, iters);
    double libc = scale_run(h, 0, nprocs, size, iters);
    printf("{\"nprocs\": %d, \"iters\": %ld, \"size\": %llu, \"core_pairs_per_s\": %.1f, "
           "\"glibc_pairs_per_s\": %.1f}\n",
           nprocs, iters, (unsigned long long)size, core, libc);
    shm_handle_close(h);
    return 0;
}

struct rec {
    uint32_t op;
    uint32_t id;
    uint64_t size;
};

static int cmd_replay(int argc, char **argv) {
    if (argc < 1) die("usage: bench_c replay FILE");
    /* grow the heap by what is asked, not 128 KiB more: the footprint then follows the highest
     * byte handed out, as it is measured for the arena */
    mallopt(M_TOP_PAD, 0);
    FILE *f = fopen(argv[0], "rb");
    if (!f) die("cannot open the trace file");
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || sb.st_size % (off_t)sizeof(struct rec)) die("bad trace file");
    size_t n = (size_t)sb.st_size / sizeof(struct rec);
    struct rec *tr = malloc(n * sizeof *tr + 1);
    if (!tr || fread(tr, sizeof *tr, n, f) != n) die("cannot read the trace file");
    fclose(f);
    uint32_t maxid = 0;
    for (size_t i = 0; i < n; i++)
        if (tr[i].id > maxid) maxid = tr[i].id;
    void **ptr = calloc((size_t)maxid + 1, sizeof *ptr);
    uint64_t *req = calloc((size_t)maxid + 1, sizeof *req);
    if (!ptr || !req) die("calloc");
    struct mallinfo2 mi = mallinfo2();
    uint64_t base = mi.arena + mi.hblkhd;
    uint64_t base_used = mi.uordblks + mi.hblkhd;
    uint64_t live = 0, peak_live = 0, peak_fp = 0;
    for (size_t i = 0; i < n; i++) {
        int sample = (i % 16) == 0;
        if (tr[i].op == 1) {
            void *p = malloc(tr[i].size);
            if (!p) die("malloc");
            ptr[tr[i].id] = p;
            req[tr[i].id] = tr[i].size;
            live += tr[i].size;
            if (live > peak_live) {
                peak_live = live;
                sample = 1;
            }
        } else {
            free(ptr[tr[i].id]);
            live -= req[tr[i].id];
        }
        if (sample) {
            mi = mallinfo2();
            uint64_t fp = mi.arena + mi.hblkhd;
            if (fp > peak_fp) peak_fp = fp;
        }
    }
    /* the footprint counts the trace's growth of the heap plus what the heap already held
     * in use before it (this program's own bookkeeping arrays are allocated before base) */
    uint64_t fp = peak_fp > base ? peak_fp - base_used : 0;
    printf("{\"events\": %zu, \"peak_live\": %llu, \"peak_footprint\": %llu, "
           "\"heap_before\": %llu, \"used_before\": %llu}\n",
           n, (unsigned long long)peak_live, (unsigned long long)fp, (unsigned long long)base,
           (unsigned long long)base_used);
    free(ptr);
    free(req);
    free(tr);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "pairs") == 0) return cmd_pairs(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "scale") == 0) return cmd_scale(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "replay") == 0) return cmd_replay(argc - 2, argv + 2);
    fprintf(stderr, "usage: bench_c pairs ITERS TRIALS SIZE... | bench_c scale NPROCS ITERS SIZE"
                    " | bench_c replay FILE\n");
    return 2;
}
