/* heap.c -- carve and release blocks: split, coalesce, reserve backing pages; pressure.
 *
 * The heap is one run of blocks from heap_off to the end of the segment; a new arena holds a
 * single free block spanning it. Allocation finds a good fit (freelist.c), carves an aligned start
 * out of it if asked (the front remainder goes back as a free block), then splits off the tail when
 * what is left is at least SHM_MIN_BLOCK. Freeing merges with free physical neighbours at once
 * (boundary tags: prev_size in every header), so [B5] holds after every operation.
 *
 * Pages are reserved lazily. A 1 GiB arena is a sparse tmpfs file; touching a page that tmpfs
 * cannot supply would raise SIGBUS. So before a block is handed out, or a header written, past
 * reserved_top, we fallocate() the range on the segment's descriptor. If that fails the caller gets
 * SHM_ENOSPC (OutOfMemory in Python) and nothing in the arena has changed.
 *
 * Every function here that writes runs under the heap lock, which its callers (alloc.c, cache.c,
 * gc.c) hold; heap.c takes no lock and calls nothing above the free lists and the block headers.
 * The heap lock does not keep every other writer out of the heap: caches change the transient
 * bits of allocated blocks and the links in cached blocks' payloads without it (shm_layout.h,
 * Concurrency). Counters are updated with relaxed atomics so that stats can be read without the
 * lock; heap_cache_sum and heap_result_flags only read, and need no lock. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>

#include "shm_internal.h"

#define RESERVE_CHUNK ((uint64_t)1 << 20)

static inline uint64_t round_up(uint64_t x, uint64_t to) { return (x + to - 1) & ~(to - 1); }

static int reserve_to(shm_handle_t *h, uint64_t top) {
    shm_counters_t *c = &h->arena->counters;
    uint64_t cur = A_LOAD(&c->reserved_top);
    top = round_up(top, SHM_PAGE);
    if (top > h->capacity) top = h->capacity;
    if (LIKELY(top <= cur)) return SHM_OK;
    uint64_t want = cur + RESERVE_CHUNK > top ? cur + RESERVE_CHUNK : top;
    if (want > h->capacity) want = h->capacity;
    if (cur > h->capacity) cur = 0; /* a damaged counter: reserve from the start again */
    int rc = fallocate(h->fd, 0, (off_t)cur, (off_t)(want - cur));
    if (rc != 0 && errno == ENOSPC && want > top) {
        want = top;
        rc = fallocate(h->fd, 0, (off_t)cur, (off_t)(want - cur));
    }
    if (rc != 0) {
        if (errno == ENOSPC || errno == ENOMEM) return SHM_ENOSPC;
        return err_sys(errno, "fallocate on the arena's segment");
    }
    A_STORE(&c->reserved_top, want);
    return SHM_OK;
}

/* Set the prev_size of the block after [off, off+size), if there is one. That block may be
 * allocated, and its transient bits may change meanwhile without the lock (cache.c): journal and
 * write only prev_size and the (refcount, check) word, never the (owner, flags) word. */
static int fix_next_prev_size(shm_handle_t *h, uint64_t off, uint64_t size) {
    uint64_t next = off + size;
    if (next >= h->heap_end) return SHM_OK;
    if (block_validate(h, next) != SHM_OK) return SHM_ECORRUPT;
    shm_block_t *b = block_at(h, next);
    J(h, &b->prev_size);
    journal_save(h, &b->refcount, sizeof b->refcount + sizeof b->check);
    b->prev_size = size;
    block_reseal(h, next);
    return SHM_OK;
}

double shm_usage_percent(uint64_t total, uint64_t available) {
    if (total == 0) return 0.0;
    if (available > total) available = total;
    return 100.0 * (double)(total - available) / (double)total;
}

int shm_pressure_of_percent(double pct) {
    return pct >= 95.0   ? SHM_PRESSURE_CRITICAL
           : pct >= 80.0 ? SHM_PRESSURE_HIGH
           : pct >= 60.0 ? SHM_PRESSURE_MEDIUM
                         : SHM_PRESSURE_LOW;
}

/* Recompute the arena's pressure level from its counters; *rose is set when it went up. Available
 * is what shm_stats_read reports: the usable bytes of free blocks plus those of cached blocks. */
void pressure_update(shm_handle_t *h, int *rose) {
    shm_counters_t *c = &h->arena->counters;
    uint64_t total = h->heap_end - h->heap_off;
    uint64_t fb = A_LOAD(&c->free_bytes), fh = A_LOAD(&c->free_blocks) * SHM_HDR;
    uint64_t available = fb > fh ? fb - fh : 0;
    /* Cached bytes only lower the level: when the free blocks alone keep it LOW (the common
     * case), it is LOW without summing every slot's cache. */
    uint64_t level = (uint64_t)shm_pressure_of_percent(shm_usage_percent(total, available));
    if (level != SHM_PRESSURE_LOW) {
        available += heap_cache_sum(h, offsetof(shm_cache_t, cached_bytes));
        level = (uint64_t)shm_pressure_of_percent(shm_usage_percent(total, available));
    }
    uint64_t old = A_LOAD(&c->pressure_level);
    if (LIKELY(level == old)) return;
    A_STORE(&c->pressure_level, level);
    if (rose && level > old && level >= SHM_PRESSURE_HIGH) *rose = 1;
}

/* Carve a block of whole size `need` (aligned payload if align) owned by owner with flags, and
 * count it in the heap's counters (not in anyone's usage: the caller does that). At most `room`
 * usable bytes may be handed out (a process limit): SHM_ELIMIT, nothing changed, if the block
 * would be larger. SHM_ENOMEM / SHM_ENOSPC are returned unreported (the caller may retry). A block
 * for a cache (flags CACHED) is searched with room for a tail, so it is always of exactly `need`
 * bytes. */
int heap_carve(shm_handle_t *h, uint64_t need, uint64_t align, uint32_t owner, uint32_t flags,
               uint64_t room, uint64_t *off_out) {
    shm_counters_t *c = &h->arena->counters;
    shm_assert(need % SHM_ALIGN == 0 && need >= SHM_MIN_BLOCK);
    shm_assert(!(align & (align - 1)) && align <= SHM_PAGE);
    /* a cache's block must be of exactly `need` bytes: ask for room to split off the rest */
    uint64_t search = align                     ? need + align + SHM_MIN_BLOCK
                      : (flags & SHM_BF_CACHED) ? need + SHM_MIN_BLOCK
                                                : need;
    uint64_t off;
    int rc = freelist_find(h, search, &off);
    if (rc != SHM_OK) return rc;

    shm_block_t *b = block_at(h, off);
    uint64_t bsize = b->size, prev_size = b->prev_size;
    uint64_t front = 0;
    if (align && (off + SHM_HDR) % align)
        front = round_up(off + SHM_HDR + SHM_MIN_BLOCK, align) - SHM_HDR - off;
    uint64_t start = off + front, rest = bsize - front;
    uint64_t tail = rest - need >= SHM_MIN_BLOCK ? rest - need : 0;
    uint64_t mine = rest - tail;
    shm_assert(mine >= need && (!align || (start + SHM_HDR) % align == 0));
    shm_assert(!(flags & SHM_BF_CACHED) || mine == need);
    /* the block may keep a remainder too small to split off: the limit counts what is charged */
    if (mine - SHM_HDR > room) return SHM_ELIMIT;
    /* Reserve pages for the block, and the tail's header and links, before changing anything. */
    rc = reserve_to(h, tail ? start + mine + SHM_HDR + sizeof(shm_free_links_t) : start + mine);
    if (rc != SHM_OK) return rc;

    if ((rc = freelist_remove(h, off)) != SHM_OK) return rc;
    FAULT_POINT(FAULT_ALLOC_REMOVED);
    uint64_t new_free = 0;
    if (front) {
        block_write(h, off, front, prev_size, 0, SHM_BF_FREE, 0);
        if ((rc = freelist_insert(h, off)) != SHM_OK) return rc;
        prev_size = front;
        new_free++;
    }
    block_write(h, start, mine, prev_size, owner, flags, 0);
    FAULT_POINT(FAULT_ALLOC_CARVED);
    if (tail) {
        block_write(h, start + mine, tail, mine, 0, SHM_BF_FREE, 0);
        if ((rc = fix_next_prev_size(h, start + mine, tail)) != SHM_OK) return rc;
        if ((rc = freelist_insert(h, start + mine)) != SHM_OK) return rc;
        new_free++;
    } else if (front && (rc = fix_next_prev_size(h, start, mine)) != SHM_OK) {
        return rc;
    }

    shm_assert_internal(block_validate(h, start) == SHM_OK && block_at(h, start)->size == mine);
    shm_assert_internal(!tail || block_validate(h, start + mine) == SHM_OK);
    FAULT_POINT(FAULT_ALLOC_DONE);
    A_ADD(&c->used, mine - SHM_HDR);
    A_SUB(&c->free_bytes, mine);
    A_ADD(&c->allocated_blocks, 1);
    A_STORE(&c->free_blocks, A_LOAD(&c->free_blocks) + new_free - 1);
    *off_out = start;
    return SHM_OK;
}

/* Sum one uint64 field over every slot's cache (pressure, peaks, out-of-memory reports, gc). */
uint64_t heap_cache_sum(const shm_handle_t *h, size_t field) {
    uint64_t s = 0;
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        s += A_LOAD(
            (const uint64_t *)(const void *)((const uint8_t *)&h->arena->caches[i] + field));
    return s;
}

/* Raise the arena's peak to what users hold now: the heap's use less what sits in caches. The
 * cache path does not keep this peak; the heap path and refills do (heap lock held). slot is the
 * caller's, or -1: what its own cache holds is subtracted first, which settles the common case
 * (one process caching, the others' caches empty) without summing every slot's. */
void heap_note_peak(shm_handle_t *h, int slot) {
    shm_counters_t *c = &h->arena->counters;
    uint64_t used = A_LOAD(&c->used), peak = A_LOAD(&c->peak);
    if (used <= peak) return; /* used less cached is lower still: no sum to make */
    if (slot >= 0 && A_LOAD(&h->arena->caches[slot].cached_bytes) >= used - peak) return;
    a_raise_max(&c->peak, used - heap_cache_sum(h, offsetof(shm_cache_t, cached_bytes)));
}

/* Flag bits for an allocation's result: pressure crossed upwards, or a trim was asked for. */
int64_t heap_result_flags(shm_handle_t *h, uint32_t owner, int rose) {
    int64_t flags = rose ? (int64_t)SHM_ALLOC_PRESSURE_FLAG : 0;
    if (owner) {
        const shm_proc_t *p = &h->arena->procs[owner - 1];
        if (UNLIKELY(A_LOAD(&p->trim_seq) != A_LOAD(&p->trim_ack)))
            flags |= (int64_t)SHM_ALLOC_TRIM_FLAG;
    }
    return flags;
}

/* Give the block at off back to the heap: merge it with free neighbours, put the result on its
 * list, count it in the heap's counters; tomb (SHM_TOMB) says who freed it and how. Its owner's
 * usage is the caller's business (a cached block was not in it). *merged_end, if given, receives
 * the end of the merged free block. */
int heap_release_block(shm_handle_t *h, uint64_t off, uint32_t tomb, uint64_t *merged_end) {
    shm_counters_t *c = &h->arena->counters;
    shm_block_t *b = block_at(h, off);
    uint64_t size = b->size, prev_size = b->prev_size, got = size - SHM_HDR;
    uint64_t merged = 0;
    int rc;

    uint64_t next = off + size;
    if (next < h->heap_end) {
        if (block_validate(h, next) != SHM_OK) return SHM_ECORRUPT;
        if (block_at(h, next)->prev_size != size)
            return err_set(SHM_ECORRUPT, next,
                           "block %#llx: prev_size disagrees with its neighbour",
                           (unsigned long long)next);
    }
    if (prev_size) {
        if (prev_size > off - h->heap_off || block_validate(h, off - prev_size) != SHM_OK ||
            block_at(h, off - prev_size)->size != prev_size)
            return err_set(SHM_ECORRUPT, off, "block %#llx: prev_size %llu names no block",
                           (unsigned long long)off, (unsigned long long)prev_size);
    }
    if (next < h->heap_end && (block_at(h, next)->flags & SHM_BF_FREE)) {
        if ((rc = freelist_remove(h, next)) != SHM_OK) return rc;
        size += block_at(h, next)->size;
        block_scrub(h, next, block_at(h, next)->tomb);
        merged++;
    }
    if (prev_size && (block_at(h, off - prev_size)->flags & SHM_BF_FREE)) {
        uint64_t prev = off - prev_size;
        if ((rc = freelist_remove(h, prev)) != SHM_OK) return rc;
        block_scrub(h, off, tomb);
        tomb = block_at(h, prev)->tomb; /* the merged block starts there: its tombstone stays */
        off = prev;
        size += prev_size;
        prev_size = block_at(h, prev)->prev_size;
        merged++;
    }
    FAULT_POINT(FAULT_FREE_UNLINKED);
    block_write(h, off, size, prev_size, 0, SHM_BF_FREE, tomb);
    if ((rc = fix_next_prev_size(h, off, size)) != SHM_OK) return rc;
    if ((rc = freelist_insert(h, off)) != SHM_OK) return rc;
    FAULT_POINT(FAULT_FREE_INSERTED);
    shm_assert_internal(block_validate(h, off) == SHM_OK && block_at(h, off)->size == size);

    A_SUB(&c->used, got);
    A_ADD(&c->free_bytes, got + SHM_HDR);
    A_SUB(&c->allocated_blocks, 1);
    A_STORE(&c->free_blocks, A_LOAD(&c->free_blocks) + 1 - merged);
    if (merged_end) *merged_end = off + size;
    return SHM_OK;
}
