/* alloc.c -- the user's calls on blocks: allocate, free, release a reference, size, seal, info.
 *
 * The top layer of the core. shm_alloc and shm_free choose between the calling process's cache
 * (cache.c: small and medium blocks, no heap lock) and the heap path here (heap.c's carve and
 * release under the heap lock). The cache declines (CACHE_DECLINED) whatever it cannot serve: a
 * detached slot, a process limit the class's rounding would cross, a block that is not plainly
 * allocated; the heap path then answers, and reports any error. A free for the user
 * (alloc_free_block) also drops the block's references (own.c) and names (names.c) and takes it
 * off its owner's usage (process.c); collection (gc.c) frees through it too. */
#include <string.h>

#include "shm_internal.h"

/* Out of memory, reported as stats() counts: cached bytes are available, not used. */
static int alloc_oom(shm_handle_t *h, int status, uint64_t requested) {
    shm_counters_t *c = &h->arena->counters;
    __atomic_fetch_add(&c->oom_events, 1, __ATOMIC_RELAXED); /* no lock held here */
    uint64_t nfree = A_LOAD(&c->free_blocks), fb = A_LOAD(&c->free_bytes);
    uint64_t avail = fb > nfree * SHM_HDR ? fb - nfree * SHM_HDR : 0;
    uint64_t cached = heap_cache_sum(h, offsetof(shm_cache_t, cached_bytes));
    uint64_t used = A_LOAD(&c->used);
    return err_oom(status, requested, avail + cached, used > cached ? used - cached : 0,
                   h->heap_end - h->heap_off);
}

/* Out of memory for a caller that allocates outside shm_alloc (objects.c's tickets). */
int alloc_oom_report(shm_handle_t *h, uint64_t requested) {
    return alloc_oom(h, SHM_ENOMEM, requested);
}

static int64_t alloc_locked(shm_handle_t *h, uint64_t size, uint64_t align, uint32_t owner) {
    shm_counters_t *c = &h->arena->counters;
    shm_assert(owner >= 1 && owner <= SHM_MAX_PROCS && size > 0);
    uint64_t usable = (size + SHM_ALIGN - 1) & ~(uint64_t)(SHM_ALIGN - 1);
    uint64_t need = usable + SHM_HDR < SHM_MIN_BLOCK ? SHM_MIN_BLOCK : usable + SHM_HDR;
    int rc = proc_charge(h, owner, 0);
    if (rc != SHM_OK) return rc;
    const shm_proc_t *p = &h->arena->procs[owner - 1];
    uint64_t limit = A_LOAD(&p->limit), pused = proc_usage(h, (int)owner - 1);
    uint64_t room = !limit ? UINT64_MAX : limit > pused ? limit - pused : 0;
    if (need - SHM_HDR > room) return err_limit(p->pid, limit, pused, size);
    uint64_t off;
    rc = heap_carve(h, need, align, owner, 0, room, &off);
    if (rc == SHM_ELIMIT) return err_limit(p->pid, limit, pused, size);
    if (rc != SHM_OK) return rc; /* SHM_ENOMEM, SHM_ENOSPC unreported: shm_alloc may retry */
    uint64_t got = block_at(h, off)->size - SHM_HDR;
    A_ADD(&c->allocations, 1);
    proc_charge(h, owner, got);
    heap_note_peak(h, (int)owner - 1);
    int rose = 0;
    pressure_update(h, &rose);
    return (int64_t)(off + SHM_HDR) | heap_result_flags(h, owner, rose);
}

/* The heap path of shm_alloc: large or aligned requests, and callers without a cache. */
static int64_t alloc_heap(shm_handle_t *h, uint64_t size, uint64_t align, uint32_t owner) {
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    FAULT_POINT(FAULT_ALLOC_LOCKED);
    int64_t r = alloc_locked(h, size, align, owner);
    heap_unlock(h);
    return r;
}

int64_t shm_alloc(shm_handle_t *h, uint64_t size, uint64_t align, int32_t slot) {
    SHM_GATE(h);
    if (UNLIKELY(size == 0)) return err_set(SHM_EINVAL, 0, "cannot allocate 0 bytes");
    if (align > SHM_PAGE || (align & (align - 1))) {
        return err_set(SHM_EALIGN, align, "alignment %llu is not a power of two up to %d",
                       (unsigned long long)align, SHM_PAGE);
    }
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    return alloc_checked(h, size, align <= SHM_ALIGN ? 0 : align, slot);
}

/* shm_alloc once its arguments are known good (size > 0, align 0 or a power of two from 32 to
 * SHM_PAGE, slot in range), inside the gate: for the combined calls (objects.c, handoff.c). */
int64_t alloc_checked(shm_handle_t *h, uint64_t size, uint64_t align, int32_t slot) {
    shm_assert(size > 0 && slot >= 0 && slot < SHM_MAX_PROCS);
    if (UNLIKELY(size > h->heap_end - h->heap_off)) return alloc_oom(h, SHM_ENOMEM, size);
    int64_t r = CACHE_DECLINED;
    if (LIKELY(!align && slot == h->slot && size <= CACHE_MAX_USABLE &&
               A_LOAD(&h->arena->counters.cache_limit)))
        r = cache_alloc(h, slot, size);
    if (r == CACHE_DECLINED) r = alloc_heap(h, size, align, (uint32_t)slot + 1);
    if (UNLIKELY(r == SHM_ENOMEM || r == SHM_ENOSPC)) {
        /* Memory may sit in caches: return them all to the heap, then try once more. */
        cache_flush_all(h);
        r = alloc_heap(h, size, align, (uint32_t)slot + 1);
        if (r == SHM_ENOMEM || r == SHM_ENOSPC) return alloc_oom(h, (int)r, size);
    }
    return r;
}

/* Free the allocated (claimed) block at off for its user, heap lock held: drop its names and
 * references, take it off its owner's usage, give it back to the heap. *merged_end, if given,
 * receives the end of the free block it became part of. */
int alloc_free_block(shm_handle_t *h, uint64_t off, uint32_t tomb, uint64_t *merged_end) {
    shm_counters_t *c = &h->arena->counters;
    shm_assert(heap_offset_ok(h, off));
    shm_block_t *b = block_at(h, off);
    uint64_t got = b->size - SHM_HDR;
    uint32_t owner = b->owner;
    int rc;
    if (UNLIKELY(b->refcount) && (rc = refs_drop_block(h, off)) != SHM_OK) return rc;
    if (UNLIKELY(b->flags & SHM_BF_NAMED)) names_drop_address(h, off + SHM_HDR);
    if (h->claimed == off) h->claimed = 0; /* the block is rewritten free: nothing to let go */
    if ((rc = heap_release_block(h, off, tomb, merged_end)) != SHM_OK) return rc;
    proc_credit(h, owner, got);
    A_ADD(&c->deallocations, 1);
    A_ADD(&c->frees_since_gc, 1);
    pressure_update(h, NULL);
    return SHM_OK;
}

static int64_t free_locked(shm_handle_t *h, uint64_t address) {
    uint64_t off;
    int rc = block_from_address(h, address, &off);
    if (rc != SHM_OK || (rc = block_claim(h, off)) != SHM_OK) return rc;
    if (UNLIKELY(block_at(h, off)->flags & (SHM_BF_OBJECT | SHM_BF_OBJPART)))
        return err_set(SHM_EINVAL, address,
                       "the block at %#llx belongs to an object; delete the object instead",
                       (unsigned long long)address);
    int64_t got = (int64_t)(block_at(h, off)->size - SHM_HDR);
    rc = alloc_free_block(h, off, SHM_TOMB(SHM_TOMB_DEALLOCATED, self_pid(h)), NULL);
    return rc == SHM_OK ? got : rc;
}

/* The heap path of shm_free. */
static int64_t free_heap(shm_handle_t *h, uint64_t address) {
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    FAULT_POINT(FAULT_FREE_LOCKED);
    int64_t r = free_locked(h, address);
    heap_unlock(h);
    return r;
}

int64_t shm_free(shm_handle_t *h, uint64_t address) {
    SHM_GATE(h);
    int slot = __atomic_load_n(&h->slot, __ATOMIC_RELAXED); /* once: another thread may detach */
    int64_t r = CACHE_DECLINED;
    if (LIKELY(slot >= 0 && slot < SHM_MAX_PROCS)) r = cache_free(h, slot, address);
    return r == CACHE_DECLINED ? free_heap(h, address) : r;
}

/* Drop one reference; an orphan (owner dead) whose last reference goes is freed: returns 1. */
int shm_block_release(shm_handle_t *h, uint64_t address, int32_t slot) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    uint64_t off;
    if ((rc = block_from_address(h, address, &off)) == SHM_OK &&
        (rc = block_claim(h, off)) == SHM_OK && (rc = refs_release(h, off, slot)) == 1 &&
        (rc = alloc_free_block(h, off, SHM_TOMB(SHM_TOMB_RELEASED, self_pid(h)), NULL)) == SHM_OK)
        rc = 1;
    heap_unlock(h);
    return rc;
}

/* Usable size of the live block at address; with for_write, sealed blocks are refused.
 * Runs without the lock: a header torn by a concurrent writer fails its checksum, and then the
 * answer is taken again under the lock. */
static int64_t block_size_checked(shm_handle_t *h, uint64_t address, int for_write) {
    uint64_t off;
    int rc = block_from_address(h, address, &off);
    if (UNLIKELY(rc == SHM_ECORRUPT)) {
        if ((rc = heap_lock(h)) != SHM_OK) return rc;
        rc = block_from_address(h, address, &off);
        heap_unlock(h);
    }
    if (rc != SHM_OK) return rc;
    const shm_block_t *b = block_at(h, off);
    if (for_write && (b->flags & SHM_BF_SEALED))
        return err_set(SHM_EPROTECT, address, "the block at %#llx is sealed",
                       (unsigned long long)address);
    return (int64_t)(b->size - SHM_HDR);
}

int64_t shm_block_size(shm_handle_t *h, uint64_t address, int for_write) {
    SHM_GATE(h);
    return block_size_checked(h, address, for_write);
}

static int64_t block_span(shm_handle_t *h, uint64_t address, uint64_t offset, uint64_t n,
                          int for_write) {
    int64_t r = block_size_checked(h, address, for_write);
    if (r < 0) return r;
    uint64_t size = (uint64_t)r;
    if (offset > size)
        return err_set(
            SHM_EINVAL, address, "offset %llu is outside the block at %#llx (%llu usable bytes)",
            (unsigned long long)offset, (unsigned long long)address, (unsigned long long)size);
    if (n == UINT64_MAX) return (int64_t)(size - offset);
    if (n > size - offset)
        return err_set(SHM_EINVAL, address,
                       "%llu bytes at offset %llu cross the end of the block at %#llx (%llu usable "
                       "bytes); stay within size_of(address)",
                       (unsigned long long)n, (unsigned long long)offset,
                       (unsigned long long)address, (unsigned long long)size);
    return (int64_t)n;
}

int64_t shm_block_span(shm_handle_t *h, uint64_t address, uint64_t offset, uint64_t n,
                       int for_write) {
    SHM_GATE(h);
    return block_span(h, address, offset, n, for_write);
}

/* The bytes go in inside the gate: close cannot unmap the segment under the copy. */
int64_t shm_block_write(shm_handle_t *h, uint64_t address, uint64_t offset, const void *data,
                        uint64_t n) {
    SHM_GATE(h);
    if (UNLIKELY(n == UINT64_MAX)) return err_set(SHM_EINVAL, address, "no data is that long");
    int64_t r = block_span(h, address, offset, n, 1);
    if (r > 0) copy_in(h->base + address + offset, data, (size_t)r);
    return r;
}

int shm_block_seal(shm_handle_t *h, uint64_t address) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    uint64_t off;
    rc = block_from_address(h, address, &off);
    if (rc == SHM_OK && (rc = block_claim(h, off)) == SHM_OK) {
        block_edit(h, off)->flags |= SHM_BF_SEALED;
        block_reseal(h, off);
    }
    heap_unlock(h);
    return rc;
}

int shm_block_info(shm_handle_t *h, uint64_t address, shm_block_info_t *out) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    uint64_t off;
    rc = block_from_address(h, address, &off);
    if (rc == SHM_OK) {
        const shm_block_t *b = block_at(h, off);
        out->address = address;
        out->size = b->size - SHM_HDR;
        out->flags = b->flags;
        out->refcount = b->refcount;
        out->slot = (int32_t)b->owner - 1;
        out->pid = proc_owner_pid(h, b->owner);
    }
    heap_unlock(h);
    return rc;
}
