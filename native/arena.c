/* arena.c -- formatting a new segment, validating one before trusting it, and O(1) statistics.
 *
 * shm_arena_format() lays out the header and one free block spanning the heap, and writes the
 * magic last (with a release fence), so a process that attaches while another is still formatting
 * sees no magic and is refused rather than seeing half an arena. shm_handle_open() checks every
 * header field it will rely on [A1] [A2] against the mapping it was given before it returns. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "shm_internal.h"

/* Sizes the layout relies on; every field offset is checked against its "+0x" comment in
 * shm_layout.h by tests/test_layout.py. */
_Static_assert(sizeof(shm_block_t) == 32, "block header is 32 bytes");
_Static_assert(sizeof(shm_block_t) + sizeof(shm_free_links_t) <= SHM_MIN_BLOCK, "min block");
_Static_assert(sizeof(shm_proc_t) == 128, "process slot is two cache lines");
_Static_assert(sizeof(shm_lock_t) == 128, "a lock is two cache lines");
_Static_assert(sizeof(shm_cache_t) == 0x440, "a cache is 17 cache lines");
_Static_assert(sizeof(shm_event_t) == 64, "an event is one cache line");

uint64_t shm_header_size(void) { return SHM_HEADER_BYTES; }

static void handle_fill(shm_handle_t *h, void *base, uint64_t capacity, int fd, uint64_t salt) {
    h->base = base;
    h->arena = base;
    h->capacity = capacity;
    h->heap_off = shm_header_size();
    h->heap_end = capacity;
    h->salt = salt;
    h->fd = fd;
    h->seg_dev = h->seg_ino = 0;
    h->slot = -1;
    h->claimed = 0;
    h->gate = 0;
    h->orphaned = 0;
    h->closer = 0;
    h->next = NULL;
}

int shm_arena_format(void *base, uint64_t capacity, int fd, uint64_t salt, uint64_t now_ns) {
    uint64_t hs = shm_header_size();
    if (capacity % SHM_PAGE || capacity < hs + SHM_PAGE || capacity > SHM_MAX_CAPACITY)
        return err_set(SHM_EINVAL, capacity,
                       "capacity %llu must be a multiple of %d between %llu and %llu bytes",
                       (unsigned long long)capacity, SHM_PAGE, (unsigned long long)(hs + SHM_PAGE),
                       (unsigned long long)SHM_MAX_CAPACITY);
    if (fallocate(fd, 0, 0, (off_t)(hs + SHM_PAGE)) != 0) /* header + first heap page */
        return errno == ENOSPC ? err_oom(SHM_ENOSPC, hs + SHM_PAGE, 0, 0, capacity)
                               : err_sys(errno, "fallocate on the new segment");
    shm_arena_t *a = base;
    memset(a, 0, sizeof *a);
    a->version = SHM_LAYOUT_VERSION;
    a->header_size = sizeof(shm_arena_t);
    a->capacity = capacity;
    a->heap_off = hs;
    a->heap_size = capacity - hs;
    a->salt = salt;
    a->created_ns = now_ns;
    a->max_procs = SHM_MAX_PROCS;
    a->nbins = SHM_NBINS;
    a->counters.reserved_top = hs + SHM_PAGE;
    for (uint64_t i = 0; i < SHM_RING_SLOTS; i++) a->ring.slots[i].seq = i;
    /* One process may keep 1/512 of the heap cached, at most 4 MiB: all 128 together at most 1/4.
     * Below 64 KiB a cache would hold too little to pay for itself: arenas under 32 MiB start
     * without caches (shm_cache_set_limit changes it). */
    uint64_t cache_limit = a->heap_size / 512;
    if (cache_limit > ((uint64_t)4 << 20)) cache_limit = (uint64_t)4 << 20;
    a->counters.cache_limit = cache_limit < 65536 ? 0 : cache_limit;
    int rc = lock_init(&a->heap_lock);
    for (int i = 0; rc == SHM_OK && i < SHM_MAX_PROCS; i++) rc = lock_init(&a->slot_locks[i]);
    for (int i = 0; rc == SHM_OK && i < SHM_MAX_PROCS; i++) rc = lock_init(&a->life_locks[i]);
    if (rc != SHM_OK) return rc;

    shm_handle_t h;
    handle_fill(&h, base, capacity, fd, salt);
    block_write(&h, hs, capacity - hs, 0, 0, SHM_BF_FREE, 0);
    if ((rc = freelist_insert(&h, hs)) != SHM_OK) return rc;
    a->counters.free_bytes = capacity - hs;
    a->counters.free_blocks = 1;
    __atomic_store_n(&a->magic, (uint64_t)SHM_MAGIC, __ATOMIC_RELEASE);
    return SHM_OK;
}

/* This process's handles not yet freed. A child made by fork() is another process: the slot its
 * parent attached (and that slot's cache, lock and pending word) is not its own, so the child's
 * copies of the handles forget it until the child attaches its own (shm_proc_attach); and the
 * threads that were inside calls in the parent do not exist in the child, so its gates count none
 * (a handle the parent was closing stays closing, but the child may finish the close itself). */
static pthread_mutex_t handles_mu = PTHREAD_MUTEX_INITIALIZER;
static shm_handle_t *handles;

static void forget_slots_in_child(void) {
    for (shm_handle_t *h = handles; h; h = h->next) {
        h->slot = -1;
        uint32_t closing = h->gate & GATE_CLOSING;
        h->gate = closing;
        h->orphaned = closing != 0;
    }
    pthread_mutex_init(&handles_mu, NULL);
}

static void handles_add(shm_handle_t *h) {
    pthread_mutex_lock(&handles_mu);
    static int registered;
    if (!registered) registered = pthread_atfork(NULL, NULL, forget_slots_in_child) == 0;
    h->next = handles;
    handles = h;
    pthread_mutex_unlock(&handles_mu);
}

int shm_handle_open(void *base, uint64_t capacity, int fd, shm_handle_t **out) {
    const shm_arena_t *a = base;
    uint64_t hs = shm_header_size();
    if (capacity < hs + SHM_PAGE)
        return err_set(SHM_ELAYOUT, 0, "the segment is %llu bytes, too small for an arena",
                       (unsigned long long)capacity);
    if (__atomic_load_n(&a->magic, __ATOMIC_ACQUIRE) != SHM_MAGIC)
        return err_set(SHM_ENOTARENA, 0, "no shmalloc magic at offset 0 (found %#llx)",
                       (unsigned long long)a->magic);
    if (a->version != SHM_LAYOUT_VERSION || a->header_size != sizeof(shm_arena_t))
        return err_set(SHM_ELAYOUT, 8,
                       "layout version %u (header %u bytes); this build reads %d (%zu)", a->version,
                       a->header_size, SHM_LAYOUT_VERSION, sizeof(shm_arena_t));
    if (a->capacity > capacity && a->heap_off == hs && a->heap_size == a->capacity - hs)
        return err_set(SHM_ECORRUPT, capacity,
                       "the segment is %llu bytes, its arena header says %llu: it was truncated "
                       "by a process of this user, and the blocks past its end are lost",
                       (unsigned long long)capacity, (unsigned long long)a->capacity);
    if (a->capacity != capacity || a->heap_off != hs || a->heap_size != capacity - hs ||
        a->max_procs != SHM_MAX_PROCS || a->nbins != SHM_NBINS)
        return err_set(SHM_ELAYOUT, 0x10,
                       "header says capacity %llu, heap at %llu; the segment is %llu bytes",
                       (unsigned long long)a->capacity, (unsigned long long)a->heap_off,
                       (unsigned long long)capacity);
    fault_init();
    struct stat st;
    if (fstat(fd, &st) != 0) return err_sys(errno, "fstat of the segment");
    shm_handle_t *h = malloc(sizeof *h);
    if (!h) return err_sys(ENOMEM, "malloc");
    handle_fill(h, base, capacity, fd, a->salt);
    h->seg_dev = (uint64_t)st.st_dev;
    h->seg_ino = (uint64_t)st.st_ino;
    handles_add(h);
    *out = h;
    return SHM_OK;
}

/* The gate. Python calls the C core without the GIL (cffi releases it), so one thread may close
 * an arena while others are inside calls that read the mapping: unmapping it then would crash
 * them, and freeing the handle would pull their pointer away. So every public call that touches
 * the segment enters the handle's gate and leaves it on return (SHM_GATE: one atomic add and one
 * subtract, uncontended but for the threads of this process that share the handle), and closing
 * is three steps:
 *   shutdown  sets GATE_CLOSING: from then on every call is refused with SHM_ECLOSED (Python:
 *             ValueError, "closed in this process"), but the closing thread's own (it detaches
 *             the slot); then waits (a futex on the gate word, woken by each leaving call once
 *             GATE_CLOSING is set) until no other thread is inside. Only then does Python unmap
 *             the segment.
 *   reopen    clears GATE_CLOSING again when the unmap is refused (views still alive);
 *   closed    once the segment is unmapped: the closing thread is refused from then on too (a
 *             handle kept past the close, by a Port or a cffi object, never reaches the unmapped
 *             addresses, whichever thread calls).
 *   free      gives the handle's memory back; Python calls it when the last reference to the
 *             handle's cffi object goes (ffi.gc), so a thread that read the pointer before the
 *             close still points at a live handle, whose gate refuses it.
 * Enter and shutdown are read-modify-writes of the same word, so they are totally ordered: either
 * the call entered first and shutdown waits for it, or it sees GATE_CLOSING and backs out. */
int gate_refuse(shm_handle_t *h) {
    if (__atomic_load_n(&h->closer, __ATOMIC_RELAXED) == (int32_t)gettid()) return SHM_OK;
    if (__atomic_sub_fetch(&h->gate, 1, __ATOMIC_RELEASE) & GATE_CLOSING) gate_wake(h);
    return err_set(SHM_ECLOSED, 0, "the arena is closed in this process; attach to it again");
}

void gate_wake(shm_handle_t *h) {
    syscall(SYS_futex, &h->gate, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

int shm_handle_shutdown(shm_handle_t *h) {
    uint32_t n = __atomic_fetch_or(&h->gate, GATE_CLOSING, __ATOMIC_ACQ_REL);
    /* closing already: another thread closes it, unless that thread is gone (fork) */
    if ((n & GATE_CLOSING) && !__atomic_exchange_n(&h->orphaned, 0, __ATOMIC_ACQ_REL)) return 0;
    __atomic_store_n(&h->closer, (int32_t)gettid(), __ATOMIC_RELAXED);
    while ((n = __atomic_load_n(&h->gate, __ATOMIC_ACQUIRE)) != GATE_CLOSING)
        syscall(SYS_futex, &h->gate, FUTEX_WAIT_PRIVATE, n, NULL, NULL, 0);
    return 1;
}

void shm_handle_closed(shm_handle_t *h) { __atomic_store_n(&h->closer, 0, __ATOMIC_RELAXED); }

void shm_handle_reopen(shm_handle_t *h) {
    __atomic_store_n(&h->closer, 0, __ATOMIC_RELAXED);
    __atomic_fetch_and(&h->gate, ~GATE_CLOSING, __ATOMIC_RELEASE);
}

/* When the last handle of this process on a segment is freed, its life lock is let go (life.c). */
void shm_handle_free(shm_handle_t *h) {
    pthread_mutex_lock(&handles_mu);
    int others = 0;
    for (shm_handle_t **p = &handles; *p;) {
        if (*p == h) {
            *p = h->next;
            continue;
        }
        others += (*p)->seg_dev == h->seg_dev && (*p)->seg_ino == h->seg_ino;
        p = &(*p)->next;
    }
    pthread_mutex_unlock(&handles_mu);
    if (!others) life_forget(h->seg_dev, h->seg_ino);
    free(h);
}

void shm_handle_close(shm_handle_t *h) {
    shm_handle_shutdown(h);
    shm_handle_free(h);
}

int shm_debug_level(void) { return SHMALLOC_DEBUG; }

uint32_t shm_layout_version(void) { return SHM_LAYOUT_VERSION; }

/* The magic and the version: the head of shm_arena_t. */
uint64_t shm_segment_probe_size(void) { return offsetof(shm_arena_t, version) + sizeof(uint32_t); }

/* What the first bytes of a segment say it is. A magic of zeros (or no bytes at all) is a segment
 * whose creator has not written the magic yet: it writes the magic last (shm_arena_format), after
 * the version. */
int shm_segment_probe(const void *head, uint64_t len) {
    const uint8_t *p = head;
    uint64_t n = len < sizeof(uint64_t) ? len : sizeof(uint64_t); /* the magic's bytes */
    int zero = 1;
    for (uint64_t i = 0; i < n && zero; i++) zero = p[i] == 0;
    if (zero) return SHM_SEG_FORMATTING;
    if (len < shm_segment_probe_size()) return SHM_SEG_FOREIGN;
    uint64_t magic;
    uint32_t version;
    memcpy(&magic, p + offsetof(shm_arena_t, magic), sizeof magic);
    memcpy(&version, p + offsetof(shm_arena_t, version), sizeof version);
    if (magic != SHM_MAGIC) return SHM_SEG_FOREIGN;
    return version == SHM_LAYOUT_VERSION ? SHM_SEG_ARENA : SHM_SEG_OTHER_VERSION;
}

/* The heap's counters count cached blocks as allocated; a user sees them as free. */
int shm_stats_read(shm_handle_t *h, shm_stats_t *out) {
    SHM_GATE(h);
    const shm_counters_t *c = &h->arena->counters;
    uint64_t cached = 0, ncached = 0, nallocs = 0, nfrees = 0, rbytes = 0, rblocks = 0,
             peak_one = 0;
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        const shm_cache_t *k = &h->arena->caches[i];
        cached += A_LOAD(&k->cached_bytes);
        ncached += A_LOAD(&k->cached_blocks);
        nallocs += A_LOAD(&k->nallocs);
        nfrees += A_LOAD(&k->nfrees);
        rbytes += A_LOAD(&k->remote_bytes);
        rblocks += A_LOAD(&k->remote_blocks);
        uint64_t pp = A_LOAD(&h->arena->procs[i].peak);
        if (pp > peak_one) peak_one = pp;
    }
    memset(out, 0, sizeof *out);
    out->total = h->heap_end - h->heap_off;
    out->capacity = h->capacity;
    uint64_t used = A_LOAD(&c->used), blocks = A_LOAD(&c->allocated_blocks);
    /* blocks freed to another process's remote list count as freed already (not yet reusable) */
    out->used = used > cached + rbytes ? used - cached - rbytes : 0;
    out->allocated_blocks = blocks > ncached + rblocks ? blocks - ncached - rblocks : 0;
    out->free_blocks = A_LOAD(&c->free_blocks) + ncached + rblocks;
    out->overhead = out->allocated_blocks * SHM_HDR;
    uint64_t fb = A_LOAD(&c->free_bytes), fh = A_LOAD(&c->free_blocks) * SHM_HDR;
    out->available = (fb > fh ? fb - fh : 0) + cached;
    out->cached = cached;
    out->cache_limit = A_LOAD(&c->cache_limit);
    if (out->available > out->total) out->available = out->total; /* damaged counters: stay sane */
    /* The cache path does not keep the arena's peak (refills and the heap path do): raise it to
     * what is used now, and to any one process's peak (which the cache path does keep). */
    out->peak = a_raise_max(&h->arena->counters.peak, out->used);
    if (out->peak < peak_one && peak_one <= out->total) out->peak = peak_one;
    out->allocations = A_LOAD(&c->allocations) + nallocs;
    out->deallocations = A_LOAD(&c->deallocations) + nfrees + rblocks;
    int64_t cache_frees = (int64_t)(nfrees - A_LOAD(&c->gc_cache_base)); /* since the last gc */
    out->frees_since_gc = A_LOAD(&c->frees_since_gc) +
                          (cache_frees > 0 ? (uint64_t)cache_frees : 0);
    out->reserved = A_LOAD(&c->reserved_top);
    out->lock_recoveries = A_LOAD(&c->lock_recoveries);
    out->oom_events = A_LOAD(&c->oom_events);
    out->gc_runs = A_LOAD(&c->gc_runs);
    return SHM_OK;
}

int shm_pressure_level(shm_handle_t *h) {
    SHM_GATE(h);
    return (int)A_LOAD(&h->arena->counters.pressure_level);
}

int64_t shm_largest_free(shm_handle_t *h) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    uint64_t s = 0;
    rc = freelist_largest(h, &s);
    heap_unlock(h);
    if (rc != SHM_OK) return rc;
    return s ? (int64_t)(s - SHM_HDR) : 0;
}

/* The full walk (check.c) with every lock held. Slot locks first, in slot order, then the heap
 * lock: the order every path takes them in. */
int shm_check(shm_handle_t *h, shm_check_report_t *out) {
    SHM_GATE(h);
    const shm_arena_t *a = h->arena;
    int rc = shm_segment_check(h); /* before touching a page that may be gone */
    if (rc != SHM_OK) return rc;
    if (a->magic != SHM_MAGIC || a->version != SHM_LAYOUT_VERSION || a->capacity != h->capacity ||
        a->heap_off != h->heap_off || a->salt != h->salt)
        return err_set(SHM_ECORRUPT, 0, "[A1] [A2] the arena header has changed since attach");
    int locked[SHM_MAX_PROCS] = {0};
    for (int i = 0; i < SHM_MAX_PROCS && rc == SHM_OK; i++)
        if (A_LOAD(&a->procs[i].state) == SHM_PROC_LIVE && (rc = slot_lock(h, i, 1)) == SHM_OK)
            locked[i] = 1;
    if (rc == SHM_OK && (rc = heap_lock(h)) == SHM_OK) {
        int full = 1; /* a slot that became live after its turn above is not locked */
        for (int i = 0; i < SHM_MAX_PROCS; i++)
            if (A_LOAD(&a->procs[i].state) == SHM_PROC_LIVE && !locked[i]) full = 0;
        rc = check_locked(h, out, full);
        heap_unlock(h);
    }
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (locked[i]) slot_unlock(h, i);
    return rc;
}
