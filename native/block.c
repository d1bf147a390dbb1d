/* block.c -- block headers: writing them, sealing them with a checksum, and validating them.
 *
 * Every header write goes through block_write() or block_edit() ... block_reseal(), so the old
 * header is journaled first (journal.c) and the checksum [B1] is always current. Nothing read from
 * a header is trusted before block_validate() has checked its offset against the heap's bounds, its
 * size [B2] and its checksum [B1]. */
#include <stdio.h>
#include <unistd.h>

#include "shm_internal.h"

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* One multiply per field, all independent (they pipeline), then one finalising mix: each field
 * and the offset change the result, and without the arena's random salt the value cannot be
 * forged by writing plausible bytes. It detects damage; it is not a cryptographic MAC.
 * Not covered: the transient flag bits, which lock-free paths compare-and-swap (cache.c): a reseal
 * under the heap lock computes the same value whatever they are meanwhile. A lock-free reader that
 * catches a header between two writes of the lock's holder sees a bad checksum and asks again
 * under the lock before it calls anything corruption. */
uint32_t block_checksum(const shm_handle_t *h, uint64_t off, const shm_block_t *b) {
    uint64_t x = h->salt ^ (off * 0x9e3779b97f4a7c15ULL);
    x ^= b->size * 0xc2b2ae3d27d4eb4fULL;
    x ^= (b->prev_size + 1) * 0x165667b19e3779f9ULL;
    uint32_t flags = b->flags & ~(uint32_t)SHM_BF_TRANSIENT;
    x ^= ((((uint64_t)b->owner << 32) | flags) + 3) * 0xd6e8feb86659fd93ULL;
    x ^= ((uint64_t)b->refcount + 7) * 0x94d049bb133111ebULL;
    x = mix64(x);
    return (uint32_t)(x ^ (x >> 32));
}

/* The block at off is owned by a process and allocated: claim it for a change under the heap
 * lock, so that no lock-free actor (its owner's cache, a remote free; cache.c) moves it
 * meanwhile. BUSY is set only by the heap lock's holder, so a BUSY found here was left by a holder
 * that died (the journal put it back): it is ours now. Fails with SHM_EADDR if the block was freed
 * into a cache or a remote list; then nothing changed. Blocks that are free, persistent or owned
 * by nobody need no claim (no lock-free path touches them). */
int block_claim(shm_handle_t *h, uint64_t off) {
    uint64_t *w = block_word(h, off);
    uint64_t cur = __atomic_load_n(w, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t owner = (uint32_t)cur, flags = (uint32_t)(cur >> 32);
        if (!owner || (flags & SHM_BF_FREE)) return SHM_OK;
        if (flags & SHM_BF_BUSY) break;
        if (flags & (SHM_BF_CACHED | SHM_BF_REMOTE)) return block_err_freed(h, off + SHM_HDR, off);
        uint64_t want = cur | ((uint64_t)SHM_BF_BUSY << 32);
        if (__atomic_compare_exchange_n(w, &cur, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
    }
    if (h->claimed && h->claimed != off) block_unclaim(h, h->claimed);
    h->claimed = off; /* heap_unlock lets go of it */
    return SHM_OK;
}

/* Let go of a claim (no-op if the block was freed or rewritten meanwhile). */
void block_unclaim(shm_handle_t *h, uint64_t off) {
    __atomic_fetch_and(block_word(h, off), ~((uint64_t)SHM_BF_BUSY << 32), __ATOMIC_RELEASE);
    if (h->claimed == off) h->claimed = 0;
}

/* Journal the header at off and return it for changes; finish with block_reseal(). */
shm_block_t *block_edit(shm_handle_t *h, uint64_t off) {
    shm_block_t *b = block_at(h, off);
    J(h, b);
    return b;
}

void block_write(shm_handle_t *h, uint64_t off, uint64_t size, uint64_t prev_size, uint32_t owner,
                 uint32_t flags, uint32_t refcount) {
    shm_block_t *b = block_edit(h, off);
    b->size = size;
    b->prev_size = prev_size;
    b->owner = owner;
    b->flags = flags;
    b->refcount = refcount;
    b->check = block_checksum(h, off, b);
}

void block_reseal(const shm_handle_t *h, uint64_t off) {
    shm_block_t *b = block_at(h, off);
    b->check = block_checksum(h, off, b);
}

/* The header at off is now inside a merged block: wipe it, so that a stale address pointing at it
 * (a double free, a use after free) finds no header rather than an old but intact one; what is
 * left is its tombstone, for the message that stale address will get. */
void block_scrub(shm_handle_t *h, uint64_t off, uint32_t tomb) {
    shm_block_t *b = block_edit(h, off);
    b->size = 0;
    b->owner = 0;
    b->flags = 0;
    b->tomb = tomb;
    b->check = ~block_checksum(h, off, b);
}

/* This process's pid as its slot records it (no system call), for tombstones. */
uint32_t self_pid(const shm_handle_t *h) {
    uint32_t pid = proc_owner_pid(h, (uint32_t)(__atomic_load_n(&h->slot, __ATOMIC_RELAXED) + 1));
    return pid ? pid : (uint32_t)getpid(); /* no slot yet */
}

/* SHM_EADDR for an address whose block was freed: the header at off is free, wiped by a merge
 * (its tombstone says by whom), or sits in a cache or on a remote list (its owner says whose). */
int block_err_freed(const shm_handle_t *h, uint64_t address, uint64_t off) {
    shm_block_t b = *block_at(h, off);
    uint32_t flags = b.flags & SHM_BF_TRANSIENT, pid = SHM_TOMB_PID(b.tomb);
    const char *how = NULL; /* ends with "process", for the pid */
    if (flags == SHM_BF_CACHED || flags == SHM_BF_REMOTE) {
        how = flags == SHM_BF_CACHED ? "freed by deallocate(); it waits in the cache of process"
                                     : "freed by deallocate() in another process; it waits to go "
                                       "back to its owner, process";
        pid = proc_owner_pid(h, b.owner);
    } else {
        switch (SHM_TOMB_WHY(b.tomb)) {
        case SHM_TOMB_DEALLOCATED:
            how = "freed by deallocate() in process";
            break;
        case SHM_TOMB_CACHE:
            how = "freed by deallocate() and given back since by the cache of process";
            break;
        case SHM_TOMB_RECLAIMED:
            how = "reclaimed from its owner by a collection in process";
            break;
        case SHM_TOMB_RELEASED:
            how = "freed when its last reference was released in process";
            break;
        case SHM_TOMB_OBJECT:
            how = "freed with the object it belonged to, in process";
            break;
        }
    }
    if (!how || !pid)
        return err_set(SHM_EADDR, address, "the block at address %#llx was freed",
                       (unsigned long long)address);
    return err_set(SHM_EADDR, address, "the block at address %#llx was %s %u",
                   (unsigned long long)address, how, pid);
}

/* Is there a sound block header at off? [B1] [B2] */
int block_validate(const shm_handle_t *h, uint64_t off) {
    if (UNLIKELY(!heap_offset_ok(h, off)))
        return err_set(SHM_ECORRUPT, off, "block offset %#llx lies outside the heap [%#llx, %#llx)",
                       (unsigned long long)off, (unsigned long long)h->heap_off,
                       (unsigned long long)h->heap_end);
    const shm_block_t *b = block_at(h, off);
    shm_block_t copy = *b; /* one read of the fields the checksum covers */
    if (UNLIKELY(copy.check != block_checksum(h, off, &copy)))
        return err_set(SHM_ECORRUPT, off, "block header at %#llx fails its checksum",
                       (unsigned long long)off);
    if (UNLIKELY(copy.size < SHM_MIN_BLOCK || copy.size % SHM_ALIGN ||
                 copy.size > h->heap_end - off))
        return err_set(SHM_ECORRUPT, off, "block at %#llx has impossible size %llu",
                       (unsigned long long)off, (unsigned long long)copy.size);
    return SHM_OK;
}

/* Is the header at off one that block_scrub() wiped: a block freed and merged into a neighbour? */
static int block_is_scrubbed(const shm_handle_t *h, uint64_t off) {
    shm_block_t copy = *block_at(h, off);
    return copy.size == 0 && copy.check == ~block_checksum(h, off, &copy);
}

/* Walk the heap from its start to decide whether off is a block start whose header is damaged
 * (corruption) or no block start at all (a bad address: a block freed since, or a pointer into a
 * block). Only error paths come here. */
static int block_classify_bad(const shm_handle_t *h, uint64_t address, uint64_t off) {
    uint64_t cur = h->heap_off, around = cur;
    while (cur < off) {
        if (block_validate(h, cur) != SHM_OK) return SHM_ECORRUPT;
        around = cur;
        cur += block_at(h, cur)->size;
    }
    if (cur == off)
        return err_set(SHM_ECORRUPT, off, "the header of the block at address %#llx is damaged",
                       (unsigned long long)address);
    if (block_is_scrubbed(h, off)) return block_err_freed(h, address, off);
    if (block_at(h, around)->flags & SHM_BF_FREE)
        return err_set(SHM_EADDR, address,
                       "the block at address %#llx was freed (it lies in free memory now)",
                       (unsigned long long)address);
    return err_set(SHM_EADDR, address, "address %#llx lies inside a block, not at its start",
                   (unsigned long long)address);
}

/* Map a user address to its block's offset; the block must be allocated (a block in a cache or
 * on a remote list is free from the user's view). */
int block_from_address(const shm_handle_t *h, uint64_t address, uint64_t *off_out) {
    if (UNLIKELY(address < h->heap_off + SHM_HDR || address >= h->heap_end || address % SHM_ALIGN))
        return err_set(SHM_EADDR, address,
                       "address %#llx is outside the heap [%#llx, %#llx) or not 16-byte aligned",
                       (unsigned long long)address, (unsigned long long)(h->heap_off + SHM_HDR),
                       (unsigned long long)h->heap_end);
    uint64_t off = address - SHM_HDR;
    if (UNLIKELY(block_validate(h, off) != SHM_OK)) return block_classify_bad(h, address, off);
    if (UNLIKELY(block_at(h, off)->flags & (SHM_BF_FREE | SHM_BF_CACHED | SHM_BF_REMOTE)))
        return block_err_freed(h, address, off);
    *off_out = off;
    return SHM_OK;
}

uint64_t shm_debug_block_checksum(const void *base, uint64_t capacity, uint64_t header_offset) {
    uint64_t hs = SHM_HEADER_BYTES;
    if (capacity < hs + SHM_PAGE) return 0;
    const shm_arena_t *a = base;
    shm_handle_t h = {.base = (uint8_t *)(uintptr_t)base,
                      .capacity = capacity,
                      .heap_off = hs,
                      .heap_end = capacity,
                      .salt = a->salt};
    if (!heap_offset_ok(&h, header_offset)) return 0;
    return block_checksum(&h, header_offset, block_at(&h, header_offset));
}
