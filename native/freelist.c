/* freelist.c -- segregated free lists: the bins, their bitmap, and good-fit search.
 *
 * A free block lives in the bin of its whole size (see the bin layout in shm_layout.h). To serve
 * a request of whole size `need`:
 *   1. if need is the lower bound of its bin, any block there fits: take the head;
 *   2. otherwise look at the first few blocks of need's own bin for one that fits (first fit,
 *      bounded by FIRST_FIT_PROBES so the cost stays constant);
 *   3. otherwise take the head of the first non-empty bin above need's, found with the bitmap in
 *      at most SHM_BITMAP_WORDS word scans; every block there is larger than need;
 *   4. only when no bin above has a block: scan all of need's own bin before saying out of memory.
 * The first three are O(1); the fourth runs only on the way to an out-of-memory error. Links are
 * validated as they are followed: a bad link is corruption. */
#include "shm_internal.h"

#define FIRST_FIT_PROBES 8

_Static_assert(SHM_NBINS <= 64 * SHM_BITMAP_WORDS, "bitmap too small for the bins");

static void bit_set(shm_handle_t *h, unsigned b) {
    J(h, &h->arena->bitmap[b / 64]);
    h->arena->bitmap[b / 64] |= (uint64_t)1 << (b % 64);
}
static void bit_clear(shm_handle_t *h, unsigned b) {
    J(h, &h->arena->bitmap[b / 64]);
    h->arena->bitmap[b / 64] &= ~((uint64_t)1 << (b % 64));
}
static void bin_set(shm_handle_t *h, unsigned b, uint64_t head) {
    J(h, &h->arena->bins[b]);
    h->arena->bins[b] = head;
}
static shm_free_links_t *links_edit(shm_handle_t *h, uint64_t off) {
    shm_free_links_t *l = block_links(h, off);
    J(h, l);
    return l;
}

/* First non-empty bin with index >= from, or SHM_NBINS. */
static unsigned bin_first_from(const shm_arena_t *a, unsigned from) {
    for (unsigned w = from / 64; w < SHM_BITMAP_WORDS; w++) {
        uint64_t bits = a->bitmap[w];
        if (w == from / 64) bits &= ~(uint64_t)0 << (from % 64);
        if (bits) {
            unsigned b = w * 64 + (unsigned)__builtin_ctzll(bits);
            return b < SHM_NBINS ? b : SHM_NBINS;
        }
    }
    return SHM_NBINS;
}

/* A link read from the segment must name a sound free block. */
static int link_check(shm_handle_t *h, uint64_t from, uint64_t to) {
    if (block_validate(h, to) != SHM_OK || !(block_at(h, to)->flags & SHM_BF_FREE))
        return err_set(SHM_ECORRUPT, from, "free-list link at %#llx names %#llx, not a free block",
                       (unsigned long long)from, (unsigned long long)to);
    return SHM_OK;
}

int freelist_insert(shm_handle_t *h, uint64_t off) {
    shm_arena_t *a = h->arena;
    unsigned b = bin_of_size(block_at(h, off)->size);
    uint64_t head = a->bins[b];
    if (head && link_check(h, off, head) != SHM_OK) return SHM_ECORRUPT;
    shm_free_links_t *l = links_edit(h, off);
    l->next = head;
    l->prev = 0;
    if (head) links_edit(h, head)->prev = off;
    bin_set(h, b, off);
    if (!head) bit_set(h, b);
    return SHM_OK;
}

int freelist_remove(shm_handle_t *h, uint64_t off) {
    shm_arena_t *a = h->arena;
    unsigned b = bin_of_size(block_at(h, off)->size);
    shm_free_links_t *l = links_edit(h, off);
    uint64_t next = l->next, prev = l->prev;
    if (next && (link_check(h, off, next) != SHM_OK || block_links(h, next)->prev != off))
        return err_set(SHM_ECORRUPT, off, "free block %#llx: next link %#llx does not point back",
                       (unsigned long long)off, (unsigned long long)next);
    if (prev) {
        if (link_check(h, off, prev) != SHM_OK || block_links(h, prev)->next != off)
            return err_set(SHM_ECORRUPT, off,
                           "free block %#llx: prev link %#llx does not point back",
                           (unsigned long long)off, (unsigned long long)prev);
        links_edit(h, prev)->next = next;
    } else {
        if (a->bins[b] != off)
            return err_set(SHM_ECORRUPT, off,
                           "free block %#llx has no prev link but is not the head of bin %u",
                           (unsigned long long)off, b);
        bin_set(h, b, next);
        if (!next) bit_clear(h, b);
    }
    if (next) links_edit(h, next)->prev = prev;
    l->next = l->prev = 0;
    return SHM_OK;
}

/* Last resort before out-of-memory: the whole of bin b, first fit, bounded against cycles. */
static int bin_scan(shm_handle_t *h, unsigned b, uint64_t need, uint64_t *off_out) {
    if (b >= SHM_NBINS) return SHM_ENOMEM;
    uint64_t bin_off = (uint64_t)((uint8_t *)&h->arena->bins[b] - h->base);
    uint64_t limit = (h->heap_end - h->heap_off) / SHM_MIN_BLOCK, steps = 0;
    for (uint64_t cur = h->arena->bins[b]; cur; cur = block_links(h, cur)->next) {
        if (link_check(h, bin_off, cur) != SHM_OK) return SHM_ECORRUPT;
        if (++steps > limit) return err_set(SHM_ECORRUPT, cur, "bin %u's list has a cycle", b);
        if (block_at(h, cur)->size >= need) {
            *off_out = cur;
            return SHM_OK;
        }
    }
    return SHM_ENOMEM;
}

int freelist_find(shm_handle_t *h, uint64_t need, uint64_t *off_out) {
    shm_arena_t *a = h->arena;
    unsigned b = bin_of_size(need);
    if (need != bin_min_size(b)) {
        uint64_t cur = a->bins[b];
        for (int i = 0; cur && i < FIRST_FIT_PROBES; i++) {
            if (link_check(h, (uint64_t)((uint8_t *)&a->bins[b] - h->base), cur) != SHM_OK)
                return SHM_ECORRUPT;
            if (block_at(h, cur)->size >= need) {
                *off_out = cur;
                return SHM_OK;
            }
            cur = block_links(h, cur)->next;
        }
        b++;
    }
    unsigned found = b < SHM_NBINS ? bin_first_from(a, b) : SHM_NBINS;
    if (found == SHM_NBINS)
        return need != bin_min_size(bin_of_size(need))
                   ? bin_scan(h, bin_of_size(need), need, off_out)
                   : SHM_ENOMEM;
    uint64_t head = a->bins[found];
    if (link_check(h, (uint64_t)((uint8_t *)&a->bins[found] - h->base), head) != SHM_OK)
        return SHM_ECORRUPT;
    if (block_at(h, head)->size < need)
        return err_set(SHM_ECORRUPT, head, "free block %#llx is too small for bin %u",
                       (unsigned long long)head, found);
    *off_out = head;
    return SHM_OK;
}

/* Whole size of the largest free block: the largest in the highest non-empty bin. */
int freelist_largest(shm_handle_t *h, uint64_t *size_out) {
    shm_arena_t *a = h->arena;
    *size_out = 0;
    for (int w = SHM_BITMAP_WORDS - 1; w >= 0; w--) {
        if (!a->bitmap[w]) continue;
        unsigned b = (unsigned)w * 64 + 63 - (unsigned)__builtin_clzll(a->bitmap[w]);
        uint64_t cur = a->bins[b], best = 0, steps = 0;
        while (cur) {
            if (link_check(h, cur, cur) != SHM_OK) return SHM_ECORRUPT;
            if (++steps > (h->heap_end - h->heap_off) / SHM_MIN_BLOCK)
                return err_set(SHM_ECORRUPT, cur, "bin %u's list has a cycle", b);
            uint64_t s = block_at(h, cur)->size;
            if (s > best) best = s;
            cur = block_links(h, cur)->next;
        }
        *size_out = best;
        return SHM_OK;
    }
    return SHM_OK;
}
