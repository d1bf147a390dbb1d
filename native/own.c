/* own.c -- ownership of blocks across processes: adopt, persist, and references.
 *
 * A block's owner is the slot whose process answers for it. When that process ends its blocks are
 * orphaned and gc.c frees them, except those a live process still references. References are
 * entries (block, holder slot, count) in the arena's refs table; the block header's refcount is
 * their sum [R2], so a free path needs to look at the table only when refcount != 0. References die
 * with their holder (refs_drop_slot, called by gc.c for dead slots). All under the heap lock.
 * Dropping the last reference on an orphan frees it: shm_block_release is therefore in alloc.c,
 * with the other frees, and refs_release here only says so. */
#include "shm_internal.h"

static int adopt_locked(shm_handle_t *h, uint64_t address, int32_t slot) {
    uint64_t off;
    int rc = block_from_address(h, address, &off);
    if (rc != SHM_OK || (rc = proc_live_check(h, slot)) != SHM_OK ||
        (rc = block_claim(h, off)) != SHM_OK)
        return rc;
    if (block_at(h, off)->flags & SHM_BF_NAMED)
        return err_set(SHM_EINVAL, address,
                       "the block at %#llx is named; unbind it before adopting",
                       (unsigned long long)address);
    if (block_at(h, off)->flags & (SHM_BF_OBJECT | SHM_BF_OBJPART))
        return err_set(SHM_EINVAL, address,
                       "the block at %#llx belongs to an object, which its references keep alive",
                       (unsigned long long)address);
    shm_block_t *b = block_edit(h, off);
    proc_move(h, b->owner, (uint32_t)slot + 1, b->size - SHM_HDR);
    b->owner = (uint32_t)slot + 1;
    b->flags &= ~(uint32_t)SHM_BF_PERSIST;
    block_reseal(h, off);
    return SHM_OK;
}

int shm_block_adopt(shm_handle_t *h, uint64_t address, int32_t slot) {
    SHM_GATE(h);
    LOCKED(h, adopt_locked(h, address, slot));
}

static int persist_locked(shm_handle_t *h, uint64_t address) {
    uint64_t off;
    int rc = block_from_address(h, address, &off);
    if (rc != SHM_OK || (rc = block_claim(h, off)) != SHM_OK) return rc;
    shm_block_t *b = block_edit(h, off);
    proc_move(h, b->owner, 0, b->size - SHM_HDR);
    b->owner = 0;
    b->flags |= SHM_BF_PERSIST;
    block_reseal(h, off);
    return SHM_OK;
}

int shm_block_persist(shm_handle_t *h, uint64_t address) {
    SHM_GATE(h);
    LOCKED(h, persist_locked(h, address));
}

static int retain_locked(shm_handle_t *h, uint64_t address, int32_t slot) {
    uint64_t off;
    int rc = block_from_address(h, address, &off);
    if (rc != SHM_OK || (rc = proc_live_check(h, slot)) != SHM_OK ||
        (rc = block_claim(h, off)) != SHM_OK)
        return rc;
    shm_ref_t *refs = h->arena->refs, *empty = NULL;
    uint32_t holder = (uint32_t)slot + 1;
    for (int i = 0; i < SHM_MAX_REFS; i++) {
        if (refs[i].holder == holder && refs[i].block == off) {
            empty = &refs[i];
            break;
        }
        if (!refs[i].holder && !empty) empty = &refs[i];
    }
    if (!empty)
        return err_table_full(address, "the reference table", SHM_MAX_REFS, "SHM_MAX_REFS",
                              "release references, or collect dead processes to drop theirs");
    shm_block_t *b = block_at(h, off);
    if (b->refcount == UINT32_MAX)
        return err_set(SHM_EINVAL, address, "the block at %#llx has too many references",
                       (unsigned long long)address);
    J(h, empty);
    block_edit(h, off);
    if (!empty->holder) {
        empty->block = off;
        empty->count = 0;
        empty->holder = holder;
    }
    empty->count++;
    FAULT_POINT(FAULT_RETAIN_HALF);
    b->refcount++;
    block_reseal(h, off);
    return SHM_OK;
}

int shm_block_retain(shm_handle_t *h, uint64_t address, int32_t slot) {
    SHM_GATE(h);
    LOCKED(h, retain_locked(h, address, slot));
}

/* Drop one of slot's references on the (claimed) block at off. Returns 1 when that was the last
 * reference on an orphan (its owner is dead): the caller frees it (alloc.c). */
int refs_release(shm_handle_t *h, uint64_t off, int32_t slot) {
    uint32_t holder = (uint32_t)slot + 1;
    shm_ref_t *refs = h->arena->refs;
    shm_block_t *b = block_at(h, off);
    for (int i = 0; i < SHM_MAX_REFS; i++) {
        if (refs[i].holder != holder || refs[i].block != off) continue;
        if (!b->refcount)
            return err_set(SHM_ECORRUPT, off, "[R2] block %#llx has references but refcount 0",
                           (unsigned long long)off);
        J(h, &refs[i]);
        block_edit(h, off);
        if (--refs[i].count == 0) refs[i].holder = 0;
        b->refcount--;
        block_reseal(h, off);
        return !b->refcount && proc_slot_is_valid(h, b->owner) &&
               h->arena->procs[b->owner - 1].state == SHM_PROC_DEAD;
    }
    return err_set(SHM_ENOENT, off + SHM_HDR,
                   "this process holds no reference on the block at %#llx",
                   (unsigned long long)(off + SHM_HDR));
}

/* The block at off is being freed: forget every reference to it. */
int refs_drop_block(shm_handle_t *h, uint64_t off) {
    shm_ref_t *refs = h->arena->refs;
    for (int i = 0; i < SHM_MAX_REFS; i++)
        if (refs[i].holder && refs[i].block == off) {
            J(h, &refs[i]);
            refs[i].holder = 0;
        }
    block_edit(h, off)->refcount = 0;
    block_reseal(h, off);
    return SHM_OK;
}

/* The process in slot holder-1 is gone: its references go with it. Returns how many.
 * Called only by collection (gc.c), between whose steps a checkpoint is safe. */
uint64_t refs_drop_slot(shm_handle_t *h, uint32_t holder) {
    shm_ref_t *refs = h->arena->refs;
    uint64_t dropped = 0;
    for (int i = 0; i < SHM_MAX_REFS; i++) {
        if (refs[i].holder != holder) continue;
        uint64_t off = refs[i].block;
        J(h, &refs[i]);
        refs[i].holder = 0;
        dropped += refs[i].count;
        if (block_validate(h, off) == SHM_OK &&
            block_claim(h, off) == SHM_OK) { /* else check() reports it */
            shm_block_t *b = block_edit(h, off);
            b->refcount = b->refcount > refs[i].count ? b->refcount - refs[i].count : 0;
            block_reseal(h, off);
            block_unclaim(h, off);
        }
        journal_checkpoint(h); /* one entry and its block agree again [R2]: a step of its own */
    }
    return dropped;
}

static int list_locked(shm_handle_t *h, int32_t slot, shm_block_info_t *out, uint64_t cap,
                       uint64_t *count) {
    uint64_t n = 0;
    for (uint64_t off = h->heap_off; off < h->heap_end; off += block_at(h, off)->size) {
        if (block_validate(h, off) != SHM_OK) return SHM_ECORRUPT;
        const shm_block_t *b = block_at(h, off);
        if (b->flags & (SHM_BF_FREE | SHM_BF_CACHED | SHM_BF_REMOTE)) continue; /* free to a user */
        if (slot >= -1 && (int32_t)b->owner - 1 != slot) continue;
        if (n < cap) {
            shm_block_info_t *o = &out[n];
            o->address = off + SHM_HDR;
            o->size = b->size - SHM_HDR;
            o->flags = b->flags;
            o->refcount = b->refcount;
            o->slot = (int32_t)b->owner - 1;
            o->pid = proc_owner_pid(h, b->owner);
        }
        n++;
    }
    *count = n;
    return SHM_OK;
}

/* Blocks owned by slot (-1: persistent ones, -2: every allocated block). */
int shm_blocks_list(shm_handle_t *h, int32_t slot, shm_block_info_t *out, uint64_t cap,
                    uint64_t *count) {
    SHM_GATE(h);
    LOCKED(h, list_locked(h, slot, out, cap, count));
}

int refs_held_by(shm_handle_t *h, uint32_t holder) {
    for (int i = 0; i < SHM_MAX_REFS; i++)
        if (h->arena->refs[i].holder == holder) return 1;
    return 0;
}
