/* check.c -- the full heap walk: every invariant of shm_layout.h, cited by its id.
 *
 * Runs under the heap lock (shm_check in arena.c takes it, after every live slot's lock so that
 * the caches hold still too; at SHMALLOC_DEBUG >= 3 heap_unlock runs it after every operation,
 * without the slot locks: the cache-side checks are then skipped). Every step is bounded (the heap
 * walk by the heap's size, each list walk by the number of free blocks the heap walk found), so a
 * corrupt segment gives SHM_ECORRUPT with the first bad offset, never a hang or a read outside the
 * segment. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "shm_internal.h"

#define FAIL(off, ...) return err_set(SHM_ECORRUPT, (off), __VA_ARGS__)
#define ULL(x) ((unsigned long long)(x))

typedef struct {
    uint64_t usage, nblocks, cached_bytes, cached_blocks, remote_bytes, remote_blocks;
} proc_sums_t;

/* sum of refcount over allocated blocks, from check_heap */
static __thread uint64_t heap_refcounts;

static int check_heap(shm_handle_t *h, shm_check_report_t *r, proc_sums_t *sums) {
    uint64_t off = h->heap_off, prev_size = 0;
    int prev_free = 0;
    while (off < h->heap_end) {
        if (block_validate(h, off) != SHM_OK) return SHM_ECORRUPT; /* [B1] [B2] */
        const shm_block_t *b = block_at(h, off);
        if (b->prev_size != prev_size)
            FAIL(off, "[B3] block %#llx says prev_size %llu, the previous block is %llu bytes",
                 ULL(off), ULL(b->prev_size), ULL(prev_size));
        int is_free = (b->flags & SHM_BF_FREE) != 0;
        if (is_free) {
            if (b->owner || b->flags != SHM_BF_FREE)
                FAIL(off, "[B4] free block %#llx has owner %u, flags %#x", ULL(off), b->owner,
                     b->flags);
            if (prev_free) FAIL(off, "[B5] free block %#llx follows a free block", ULL(off));
            r->free_blocks++;
            r->free_bytes += b->size;
            if (b->size - SHM_HDR > r->largest_free) r->largest_free = b->size - SHM_HDR;
        } else {
            uint32_t transient = b->flags & SHM_BF_TRANSIENT;
            if (transient && transient != SHM_BF_BUSY &&
                (!b->owner || b->refcount || b->flags != transient))
                FAIL(off, "[B4] cached or remote block %#llx has owner %u, refcount %u, flags %#x",
                     ULL(off), b->owner, b->refcount, b->flags);
            if (b->owner && !proc_slot_is_valid(h, b->owner))
                FAIL(off, "[B6] block %#llx is owned by slot %u, which is not attached", ULL(off),
                     b->owner - 1);
            if (b->owner) {
                sums[b->owner - 1].usage += b->size - SHM_HDR;
                sums[b->owner - 1].nblocks++;
                if (b->flags & SHM_BF_CACHED) {
                    sums[b->owner - 1].cached_bytes += b->size - SHM_HDR;
                    sums[b->owner - 1].cached_blocks++;
                }
                if (b->flags & SHM_BF_REMOTE) { /* freed, as users see it; reported like stats */
                    sums[b->owner - 1].remote_bytes += b->size - SHM_HDR;
                    sums[b->owner - 1].remote_blocks++;
                }
            }
            if (!b->owner && !(b->flags & SHM_BF_PERSIST))
                FAIL(off, "[B6] block %#llx has no owner and is not persistent", ULL(off));
            r->allocated_blocks++;
            r->used += b->size - SHM_HDR;
            heap_refcounts += b->refcount;
        }
        r->blocks++;
        prev_free = is_free;
        prev_size = b->size;
        off += b->size;
    }
    if (off != h->heap_end) FAIL(off, "the heap walk ends at %#llx, not at the heap end", ULL(off));
    return SHM_OK;
}

static int check_bins(shm_handle_t *h, const shm_check_report_t *r) {
    const shm_arena_t *a = h->arena;
    uint64_t listed = 0;
    for (unsigned bin = 0; bin < SHM_NBINS; bin++) {
        uint64_t head = a->bins[bin],
                 bin_off = (uint64_t)((const uint8_t *)&a->bins[bin] - h->base);
        int bit = (a->bitmap[bin / 64] >> (bin % 64)) & 1;
        if (bit != (head != 0))
            FAIL(bin_off, "[F3] bin %u: bitmap bit %d but head %#llx", bin, bit, ULL(head));
        uint64_t prev = 0;
        for (uint64_t cur = head; cur; cur = block_links(h, cur)->next) {
            if (++listed > r->free_blocks)
                FAIL(cur, "[F2] the free lists hold more blocks than the heap (a cycle?) in bin %u",
                     bin);
            if (block_validate(h, cur) != SHM_OK) return SHM_ECORRUPT;
            const shm_block_t *b = block_at(h, cur);
            if (!(b->flags & SHM_BF_FREE))
                FAIL(cur, "[F1] bin %u lists allocated block %#llx", bin, ULL(cur));
            if (bin_of_size(b->size) != bin)
                FAIL(cur, "[F2] block %#llx of %llu bytes is in bin %u, belongs in %u", ULL(cur),
                     ULL(b->size), bin, bin_of_size(b->size));
            if (block_links(h, cur)->prev != prev)
                FAIL(cur, "[F1] block %#llx: prev link %#llx, expected %#llx", ULL(cur),
                     ULL(block_links(h, cur)->prev), ULL(prev));
            prev = cur;
        }
    }
    if (listed != r->free_blocks)
        FAIL(0, "[F2] the free lists hold %llu blocks, the heap has %llu free", ULL(listed),
             ULL(r->free_blocks));
    return SHM_OK;
}

/* With the slot lock held: walk slot's cache lists [K1]. */
static int check_cache_lists(shm_handle_t *h, int slot, uint64_t *bytes, uint64_t *blocks) {
    const shm_cache_t *c = &h->arena->caches[slot];
    uint64_t nbytes = 0, n = 0;
    for (unsigned k = 0; k < SHM_CACHE_CLASSES; k++) {
        uint64_t off = c->head[k], size = cache_class_size(k);
        for (uint32_t i = 0; i < c->count[k]; i++) {
            if (block_validate(h, off) != SHM_OK || block_at(h, off)->size != size ||
                *block_word(h, off) != BLOCK_WORD(slot + 1, SHM_BF_CACHED))
                return err_set(SHM_ECORRUPT, off,
                               "[K1] slot %d class %u: entry %u at %#llx is not a cached block",
                               slot, k, i, (unsigned long long)off);
            nbytes += size - SHM_HDR;
            n++;
            off = *block_cache_link(h, off);
        }
        if (off)
            return err_set(SHM_ECORRUPT, (uint64_t)((const uint8_t *)&c->head[k] - h->base),
                           "[K1] slot %d class %u holds more blocks than its count %u", slot, k,
                           c->count[k]);
    }
    *bytes = nbytes;
    *blocks = n;
    return SHM_OK;
}

static int check_counters(shm_handle_t *h, shm_check_report_t *r, const proc_sums_t *sums,
                          int full) {
    const shm_arena_t *a = h->arena;
    const shm_counters_t *c = &a->counters;
    uint64_t coff = offsetof(shm_arena_t, counters);
    if (A_LOAD(&c->used) != r->used)
        FAIL(coff, "[C1] used counter %llu, blocks sum to %llu", ULL(c->used), ULL(r->used));
    if (A_LOAD(&c->free_bytes) != r->free_bytes)
        FAIL(coff, "[C2] free_bytes counter %llu, free blocks sum to %llu", ULL(c->free_bytes),
             ULL(r->free_bytes));
    if (A_LOAD(&c->allocated_blocks) != r->allocated_blocks ||
        A_LOAD(&c->free_blocks) != r->free_blocks)
        FAIL(coff, "[C3] block counters %llu/%llu, the walk found %llu/%llu",
             ULL(c->allocated_blocks), ULL(c->free_blocks), ULL(r->allocated_blocks),
             ULL(r->free_blocks));
    if (A_LOAD(&c->reserved_top) > h->capacity)
        FAIL(coff, "[A3] reserved_top %llu beyond capacity", ULL(c->reserved_top));
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        const shm_proc_t *p = &a->procs[i];
        const shm_cache_t *k = &a->caches[i];
        uint64_t poff = offsetof(shm_arena_t, procs) + (uint64_t)i * sizeof *p;
        if (p->state > SHM_PROC_DEAD) FAIL(poff, "[P1] slot %d has state %u", i, p->state);
        /* a LIVE slot whose life lock's holder died is dead already, though not yet marked */
        int ended = p->state == SHM_PROC_LIVE && life_peek(h, i) == SHM_LIFE_DEAD;
        if (p->state == SHM_PROC_LIVE && !ended) r->live_procs++;
        if (p->state == SHM_PROC_DEAD || ended) r->dead_procs++;
        /* The cache side changes under the slot's own lock: only a full check (every live slot
         * locked) can compare it; a dead process's cache may be torn until collected. */
        if (!full || p->state != SHM_PROC_LIVE) continue;
        uint64_t usage = p->usage + k->usage + k->cached_bytes;
        uint64_t nblocks = p->nblocks + k->nblocks + k->cached_blocks;
        if (usage != sums[i].usage || nblocks != sums[i].nblocks)
            FAIL(poff, "[K2] slot %d (pid %u) counts %llu bytes in %llu blocks, owns %llu in %llu",
                 i, p->pid, ULL(usage), ULL(nblocks), ULL(sums[i].usage), ULL(sums[i].nblocks));
        if (p->peak < p->usage + k->usage) FAIL(poff, "[P3] slot %d peak below usage", i);
        uint64_t lbytes = 0, lblocks = 0;
        if (check_cache_lists(h, i, &lbytes, &lblocks) != SHM_OK) return SHM_ECORRUPT;
        if (lbytes != k->cached_bytes || lblocks != k->cached_blocks ||
            lblocks != sums[i].cached_blocks || lbytes != sums[i].cached_bytes)
            FAIL(offsetof(shm_arena_t, caches) + (uint64_t)i * sizeof *k,
                 "[K1] slot %d: lists hold %llu bytes in %llu blocks, counters say %llu in %llu, "
                 "the heap has %llu cached",
                 i, ULL(lbytes), ULL(lblocks), ULL(k->cached_bytes), ULL(k->cached_blocks),
                 ULL(sums[i].cached_blocks));
    }
    return SHM_OK;
}

static int check_refs_names(shm_handle_t *h) {
    const shm_arena_t *a = h->arena;
    uint64_t total = 0;
    for (int i = 0; i < SHM_MAX_REFS; i++) {
        const shm_ref_t *e = &a->refs[i];
        uint64_t eoff = offsetof(shm_arena_t, refs) + (uint64_t)i * sizeof *e;
        if (!e->holder) continue;
        if (!proc_slot_is_valid(h, e->holder) || !e->count)
            FAIL(eoff, "[R1] reference entry %d: holder slot %u, count %u", i, e->holder - 1,
                 e->count);
        if (block_validate(h, e->block) != SHM_OK || (block_at(h, e->block)->flags & SHM_BF_FREE))
            FAIL(eoff, "[R1] reference entry %d names %#llx, not an allocated block", i,
                 ULL(e->block));
        total += e->count;
        int first = 1;
        uint64_t sum = 0;
        for (int j = 0; j < SHM_MAX_REFS; j++) {
            if (a->refs[j].holder && a->refs[j].block == e->block) {
                if (j < i) first = 0;
                sum += a->refs[j].count;
            }
        }
        if (first && sum != block_at(h, e->block)->refcount)
            FAIL(e->block, "[R2] block %#llx has refcount %u, the table holds %llu", ULL(e->block),
                 block_at(h, e->block)->refcount, ULL(sum));
    }
    if (total != heap_refcounts)
        FAIL(offsetof(shm_arena_t, refs), "[R2] blocks count %llu references, the table %llu",
             ULL(heap_refcounts), ULL(total));
    for (int i = 0; i < SHM_MAX_NAMES; i++) {
        const shm_name_t *e = &a->names[i];
        uint64_t eoff = offsetof(shm_arena_t, names) + (uint64_t)i * sizeof *e;
        if (!e->address) continue;
        uint64_t off;
        if (block_from_address(h, e->address, &off) != SHM_OK ||
            (block_at(h, off)->flags & (SHM_BF_NAMED | SHM_BF_PERSIST)) !=
                (SHM_BF_NAMED | SHM_BF_PERSIST))
            FAIL(eoff, "[N1] name entry %d names %#llx, not a named persistent block", i,
                 ULL(e->address));
        if (strnlen(e->name, SHM_NAME_LEN) == SHM_NAME_LEN || !e->name[0])
            FAIL(eoff, "[N2] name entry %d is not a NUL-terminated name", i);
    }
    return SHM_OK;
}

/* The whole walk, the heap lock already held; full: every live slot's lock too. */
int check_locked(shm_handle_t *h, shm_check_report_t *out, int full) {
    shm_check_report_t r = {0};
    proc_sums_t sums[SHM_MAX_PROCS] = {{0}};
    heap_refcounts = 0;
    int rc = check_heap(h, &r, sums);
    if (rc == SHM_OK) rc = check_bins(h, &r);
    if (rc == SHM_OK) rc = check_counters(h, &r, sums, full);
    if (rc == SHM_OK) rc = check_refs_names(h);
    for (int i = 0; i < SHM_MAX_PROCS; i++) { /* the user's view from here on, like stats */
        r.cached_blocks += sums[i].cached_blocks;
        r.cached_bytes += sums[i].cached_bytes;
        r.allocated_blocks -= sums[i].cached_blocks + sums[i].remote_blocks;
        r.used -= sums[i].cached_bytes + sums[i].remote_bytes;
    }
    if (rc == SHM_OK) *out = r;
    return rc;
}

/* Has the segment been truncated under its mapping? The mapping keeps its length, but the pages
 * past the file's new end are gone: touching one kills the toucher with SIGBUS. One fstat, no
 * access to the segment, so that callers ask before they touch anything (shm_check, the
 * coordinator's tick). Truncating an arena is outside what shmalloc defends against (a process of
 * the same user may do anything to its segment): this says so clearly instead of crashing where a
 * check can come first, and cannot protect an access that races the truncation. */
int shm_segment_check(shm_handle_t *h) {
    SHM_GATE(h);
    struct stat st;
    if (fstat(h->fd, &st) != 0) return err_sys(errno, "fstat of the segment");
    if ((uint64_t)st.st_size < h->capacity)
        return err_set(SHM_ECORRUPT, (uint64_t)st.st_size,
                       "the segment was truncated to %llu bytes under a %llu-byte arena (a "
                       "process of this user shrank it): the blocks past the new end are lost, "
                       "and touching them kills a process with SIGBUS",
                       (unsigned long long)st.st_size, (unsigned long long)h->capacity);
    return SHM_OK;
}
