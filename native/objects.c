/* objects.c -- Python objects in the arena: their blocks, their references, their lifetime.
 *
 * An object is a header block (flag OBJECT: shm_object_t, the buffer table, the pickle stream)
 * and one block per out-of-band buffer (flag OBJPART). It is built in two steps so that a process
 * killed half way leaves nothing behind: shm_object_create allocates plain blocks owned by the
 * caller's slot (collection frees them if it dies), the caller writes the pickle stream and the
 * buffers, and shm_object_publish turns them, in one journaled step under the heap lock, into
 * persistent object blocks held by the caller.
 *
 * Who keeps an object alive, all counted in the segment (shm_layout.h, shm_object_t):
 *   - processes: one bit per slot in `holders` (a process holds an object once, whatever number
 *     of references and values it has: Python counts those). No table entry, so no limit but the
 *     arena's memory; held[slot] counts a slot's bits, so that a slot is never given back while
 *     it holds anything and collection knows which dead slots to look for. A dead slot's bits are
 *     cleared by collection (objects_collect, called by shm_gc before its own steps).
 *   - anonymous holds (`holds`): transit tickets, queue slots, persistent handles;
 *   - a name (the header block is NAMED).
 * The call that removes the last of them frees the object at once (objects_settle): its buffers,
 * then its header. That may be many blocks: the header is first marked DYING and each freed
 * buffer's entry zeroed, with a journal checkpoint after each, so a process killed in the middle
 * leaves a DYING object that collection finishes, never a leak and never a double free.
 *
 * Lent buffers (npalloc.c): an object may be published around a block that a numpy array of its
 * creator allocated and still uses (shm_object_lend): the block becomes its one buffer without a
 * copy, and the object is LENT: its `owner` is the lender's slot, a hold that stands for the
 * array's memory and that only the lender's release of the block (shm_object_unlend, from numpy's
 * free) or the collection of the lender's dead slot drops. delete() leaves it (the array still
 * reads the memory) and own() refuses it.
 *
 * Transit tickets: pickling a reference (ObjectRef) takes a ticket, a small OBJPART block on the
 * arena's list, holding one of the object's holds until a process unpickles the reference
 * (shm_ticket_claim turns it into that process's bit) or its deadline passes (objects_expire, from
 * collection or the coordinator's tick). Times are CLOCK_MONOTONIC, shared by every process of the
 * machine. Everything here runs under the heap lock. */
#define _GNU_SOURCE
#include <string.h>
#include <time.h>

#include "shm_internal.h"

_Static_assert(sizeof(shm_object_t) == 64, "an object header is one cache line");
_Static_assert(sizeof(shm_ticket_t) == 64, "a ticket is one cache line");
_Static_assert(SHM_HOLDER_WORDS * 64 == SHM_MAX_PROCS, "one holder bit per slot");
_Static_assert(offsetof(shm_objects_t, held) == 0x80, "shm_objects_t.held");
_Static_assert(offsetof(shm_arena_t, objects) == 0x9e980, "shm_arena_t.objects");

#define DEFAULT_TRANSIT_NS (60ull * 1000000000ull)
#define OBJ_FLAGS (SHM_BF_OBJECT | SHM_BF_OBJPART)

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static shm_objects_t *section(shm_handle_t *h) { return &h->arena->objects; }

static uint64_t next_id(shm_handle_t *h) {
    shm_objects_t *s = section(h);
    J(h, &s->next_id);
    return ++s->next_id;
}

static int gone(uint64_t object, const char *why) {
    return err_set(SHM_ENOENT, object, "no object at %#llx: %s", (unsigned long long)object, why);
}

static shm_object_t *obj_of(shm_handle_t *h, uint64_t off) {
    return (shm_object_t *)(void *)(h->base + off + SHM_HDR);
}

static shm_objbuf_t *obj_table(shm_object_t *o) { return (shm_objbuf_t *)(void *)(o + 1); }

static int obj_fits(const shm_handle_t *h, uint64_t off, const shm_object_t *o) {
    uint64_t room = block_at(h, off)->size - SHM_HDR;
    return o->nbuffers <= SHM_OBJECT_MAX_BUFFERS &&
           sizeof *o + o->nbuffers * sizeof(shm_objbuf_t) <= room &&
           o->pickle_len <= room - sizeof *o - o->nbuffers * sizeof(shm_objbuf_t);
}

/* The live object at `object` (with that id, unless id is 0), its header's block offset in *off.
 * Bytes read from the segment are validated: a damaged header is corruption, a freed or reused
 * one is SHM_ENOENT. */
static int obj_find(shm_handle_t *h, uint64_t object, uint64_t id, uint64_t *off,
                    shm_object_t **out) {
    if (block_from_address(h, object, off) != SHM_OK)
        return gone(object, "it was freed (every holder dropped it)");
    const shm_block_t *b = block_at(h, *off);
    shm_object_t *o = obj_of(h, *off);
    if (!(b->flags & SHM_BF_OBJECT) || b->size - SHM_HDR < sizeof *o ||
        o->magic != SHM_OBJECT_MAGIC)
        return gone(object, "the block there is not an object any more");
    if (id && o->id != id) return gone(object, "it was freed and its memory reused");
    if (!obj_fits(h, *off, o))
        return err_set(SHM_ECORRUPT, *off, "[O1] the object header at %#llx is damaged",
                       (unsigned long long)object);
    *out = o;
    return SHM_OK;
}

static int holder_bit(const shm_object_t *o, int32_t slot) {
    return (int)((o->holders[slot / 64] >> (slot % 64)) & 1);
}

static void holder_set(shm_handle_t *h, shm_object_t *o, int32_t slot, int on) {
    uint32_t *held = &section(h)->held[slot];
    J(h, &o->holders[slot / 64]);
    J(h, held);
    if (on) {
        o->holders[slot / 64] |= (uint64_t)1 << (slot % 64);
        (*held)++;
    } else {
        o->holders[slot / 64] &= ~((uint64_t)1 << (slot % 64));
        if (*held) (*held)--;
    }
}

/* Make slot + 1 (0: nobody) the object's owner, keeping held[] counts [O2]. */
static void owner_set(shm_handle_t *h, shm_object_t *o, uint32_t owner) {
    uint32_t *held = section(h)->held;
    J(h, &o->owner);
    if (o->owner >= 1 && o->owner <= SHM_MAX_PROCS && held[o->owner - 1]) {
        J(h, &held[o->owner - 1]);
        held[o->owner - 1]--;
    }
    if (owner) {
        J(h, &held[owner - 1]);
        held[owner - 1]++;
    }
    o->owner = owner;
}

static int obj_unheld(const shm_handle_t *h, uint64_t off, const shm_object_t *o) {
    for (int i = 0; i < SHM_HOLDER_WORDS; i++)
        if (o->holders[i]) return 0;
    return !o->holds && !o->owner && !(block_at(h, off)->flags & SHM_BF_NAMED);
}

/* Free a claimed OBJECT or OBJPART block (alloc.c's free, for blocks nobody else may free). */
static int obj_block_free(shm_handle_t *h, uint64_t off, uint64_t *merged_end) {
    int rc = block_claim(h, off);
    return rc != SHM_OK
               ? rc
               : alloc_free_block(h, off, SHM_TOMB(SHM_TOMB_OBJECT, self_pid(h)), merged_end);
}

/* Free the object whose header block is at off, buffers first; see the essay for DYING. */
static int obj_free(shm_handle_t *h, uint64_t off, uint64_t *merged_end) {
    shm_objects_t *s = section(h);
    shm_object_t *o = obj_of(h, off);
    if (o->magic == SHM_OBJECT_MAGIC) {
        J(h, &o->magic);
        J(h, &s->dying);
        J(h, &s->live);
        o->magic = SHM_OBJECT_DYING;
        s->dying++;
        if (s->live) s->live--;
        journal_checkpoint(h);
    }
    if (o->flags & SHM_OBJ_QUEUE) { /* a queue: its items' holds go first (queue.c) */
        int rc = queue_release_items(h, off, o);
        if (rc != SHM_OK) return rc;
    }
    shm_objbuf_t *t = obj_table(o);
    for (uint32_t i = 0; i < o->nbuffers && i < SHM_OBJECT_MAX_BUFFERS; i++) {
        uint64_t boff;
        if (!t[i].address) continue;
        J(h, &t[i].address);
        if (block_from_address(h, t[i].address, &boff) == SHM_OK &&
            (block_at(h, boff)->flags & SHM_BF_OBJPART)) {
            int rc = obj_block_free(h, boff, NULL);
            if (rc != SHM_OK) return rc;
        } /* else check() reports it: never free what is not ours */
        t[i].address = 0;
        journal_checkpoint(h);
    }
    J(h, &s->dying);
    if (s->dying) s->dying--;
    int rc = obj_block_free(h, off, merged_end);
    journal_checkpoint(h);
    return rc;
}

/* The rule: free the object at off if nothing holds it any more. 1 if freed. */
int objects_settle(shm_handle_t *h, uint64_t off, shm_object_t *o) {
    if (!obj_unheld(h, off, o)) return 0;
    int rc = obj_free(h, off, NULL);
    return rc == SHM_OK ? 1 : rc;
}

/* shm_name_unbind lives here, above names.c: a name is one of an object's holds. */
static int unbind_locked(shm_handle_t *h, const char *name) {
    uint64_t off;
    int rc = names_unbind_locked(h, name, &off);
    if (rc != SHM_OK || !off || !(block_at(h, off)->flags & SHM_BF_OBJECT)) return rc;
    shm_object_t *o = obj_of(h, off);
    if (o->magic != SHM_OBJECT_MAGIC) return SHM_OK;
    rc = objects_settle(h, off, o); /* an object that nothing else holds goes now */
    return rc < 0 ? rc : SHM_OK;
}

int shm_name_unbind(shm_handle_t *h, const char *name) {
    SHM_GATE(h);
    int rc = names_check(name);
    if (rc != SHM_OK) return rc;
    LOCKED(h, unbind_locked(h, name));
}

int objects_held(const shm_handle_t *h, int32_t slot) {
    return slot >= 0 && slot < SHM_MAX_PROCS && h->arena->objects.held[slot] != 0;
}

/* ------------------------------------------------------------------ create and publish */

static int create_check(shm_handle_t *h, int32_t slot, uint64_t pickle_len, uint32_t nbuffers) {
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK) return rc;
    if (nbuffers > SHM_OBJECT_MAX_BUFFERS)
        return err_set(SHM_EINVAL, nbuffers, "an object has at most %d out-of-band buffers",
                       SHM_OBJECT_MAX_BUFFERS);
    if (pickle_len > h->heap_end - h->heap_off) return alloc_oom_report(h, pickle_len);
    return SHM_OK;
}

/* shm_object_create for callers inside the gate (handoff.c): the arguments are checked here once,
 * and each block comes from alloc_checked (the calling slot's cache for small ones). */
int objects_create(shm_handle_t *h, int32_t slot, uint64_t pickle_len, uint32_t nbuffers,
                   const uint64_t *sizes, uint64_t *out) {
    int rc = create_check(h, slot, pickle_len, nbuffers);
    if (rc != SHM_OK) return rc;
    uint64_t head = sizeof(shm_object_t) + nbuffers * sizeof(shm_objbuf_t) + pickle_len;
    int64_t r = alloc_checked(h, head, 0, slot);
    if (r < 0) return (int)r;
    uint64_t object = (uint64_t)r & SHM_ALLOC_ADDRESS_MASK;
    uint32_t made = 0;
    for (; made < nbuffers; made++) {
        r = alloc_checked(h, sizes[made] ? sizes[made] : 1, 0, slot);
        if (r < 0) break;
        out[2 + made] = (uint64_t)r & SHM_ALLOC_ADDRESS_MASK;
    }
    if (made < nbuffers) { /* out of memory: give back what was taken, report the failure */
        objects_discard(h, object, made, out + 2);
        return (int)r;
    }
    shm_object_t *o = (shm_object_t *)(void *)(h->base + object);
    memset(o, 0, sizeof *o); /* magic 0: not published */
    o->nbuffers = nbuffers;
    o->pickle_len = pickle_len;
    o->nbytes = pickle_len;
    shm_objbuf_t *t = obj_table(o);
    for (uint32_t i = 0; i < nbuffers; i++) {
        t[i].address = out[2 + i];
        t[i].nbytes = sizes[i];
        o->nbytes += sizes[i];
    }
    out[0] = object;
    out[1] = object + sizeof *o + nbuffers * sizeof(shm_objbuf_t);
    return SHM_OK;
}

int shm_object_create(shm_handle_t *h, int32_t slot, uint64_t pickle_len, uint32_t nbuffers,
                      const uint64_t *sizes, uint64_t *out) {
    SHM_GATE(h);
    return objects_create(h, slot, pickle_len, nbuffers, sizes, out);
}

/* Give back the plain blocks of an object that was never published (its header at object and
 * nbuffers buffers), keeping the failure the caller is about to report. */
void objects_discard(shm_handle_t *h, uint64_t object, uint32_t nbuffers, const uint64_t *bufs) {
    shm_error_info_t saved = *shm_last_error();
    for (uint32_t i = 0; i < nbuffers; i++) shm_free(h, bufs[i]);
    shm_free(h, object);
    err_restore(&saved);
}

/* Turn the claimed plain block at off, owned by owner, into a persistent object block. */
static void obj_adopt_block(shm_handle_t *h, uint64_t off, uint32_t flags) {
    shm_block_t *b = block_edit(h, off);
    proc_move(h, b->owner, 0, b->size - SHM_HDR);
    b->owner = 0;
    b->flags |= SHM_BF_PERSIST | flags;
    block_reseal(h, off);
}

static int publish_locked(shm_handle_t *h, int32_t slot, uint64_t object, int writable,
                          uint64_t *id_out) {
    uint64_t off;
    int rc = block_from_address(h, object, &off);
    if (rc != SHM_OK) return rc;
    shm_object_t *o = obj_of(h, off);
    uint32_t owner = (uint32_t)slot + 1;
    if (block_at(h, off)->owner != owner || block_at(h, off)->flags || o->magic ||
        block_at(h, off)->size - SHM_HDR < sizeof *o || !obj_fits(h, off, o))
        return err_set(SHM_EINVAL, object,
                       "the block at %#llx is not an unpublished object of this process",
                       (unsigned long long)object);
    shm_objbuf_t *t = obj_table(o);
    for (uint32_t i = 0; i < o->nbuffers; i++) { /* validate all before changing any */
        uint64_t boff;
        if ((rc = block_from_address(h, t[i].address, &boff)) != SHM_OK) return rc;
        const shm_block_t *b = block_at(h, boff);
        if (b->owner != owner || b->flags || b->size - SHM_HDR < t[i].nbytes)
            return err_set(SHM_EINVAL, t[i].address,
                           "buffer %u of the object at %#llx is not a block of this process", i,
                           (unsigned long long)object);
    }
    for (uint32_t i = 0; i < o->nbuffers; i++) {
        uint64_t boff = t[i].address - SHM_HDR;
        if ((rc = block_claim(h, boff)) != SHM_OK) return rc;
        obj_adopt_block(h, boff, SHM_BF_OBJPART | (writable ? 0 : SHM_BF_SEALED));
    }
    if ((rc = block_claim(h, off)) != SHM_OK) return rc;
    obj_adopt_block(h, off, SHM_BF_OBJECT | SHM_BF_SEALED);
    J(h, o);
    o->id = next_id(h);
    o->flags = writable ? SHM_OBJ_WRITABLE : 0;
    o->holds = 0;
    memset(o->holders, 0, sizeof o->holders);
    o->magic = SHM_OBJECT_MAGIC;
    holder_set(h, o, slot, 1);
    J(h, &section(h)->live);
    section(h)->live++;
    *id_out = o->id;
    return SHM_OK;
}

int shm_object_publish(shm_handle_t *h, int32_t slot, uint64_t object, int writable,
                       uint64_t *id_out) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    LOCKED(h, publish_locked(h, slot, object, writable, id_out));
}

/* ------------------------------------------------------------------ references */

static int open_found(shm_handle_t *h, int32_t slot, uint64_t off, shm_object_t *o,
                      shm_object_view_t *out, uint64_t *bufs, uint32_t cap) {
    if (o->flags & SHM_OBJ_DELETED) return gone(off + SHM_HDR, "it was deleted");
    uint32_t nbuffers = __atomic_load_n(&o->nbuffers, __ATOMIC_RELAXED); /* read once: bounds */
    if (nbuffers > cap)
        return err_set(SHM_EINVAL, cap, "room for %u buffers, the object has %u", cap, nbuffers);
    if (!holder_bit(o, slot)) holder_set(h, o, slot, 1);
    out->address = off + SHM_HDR;
    out->id = o->id;
    out->nbuffers = nbuffers;
    out->pickle = off + SHM_HDR + sizeof *o + nbuffers * sizeof(shm_objbuf_t);
    out->pickle_len = o->pickle_len;
    out->nbytes = o->nbytes;
    out->flags = o->flags;
    const shm_objbuf_t *t = obj_table(o);
    for (uint32_t i = 0; i < nbuffers; i++) {
        bufs[2 * i] = t[i].address;
        bufs[2 * i + 1] = t[i].nbytes;
    }
    return SHM_OK;
}

/* The words of shm_object_get's out for the object at off (header block), and its buffer pairs. */
static void view_words(uint64_t off, shm_object_t *o, uint64_t *out) {
    out[SHM_GET_ADDRESS] = off + SHM_HDR;
    out[SHM_GET_ID] = o->id;
    out[SHM_GET_PICKLE] = off + SHM_HDR + sizeof *o + o->nbuffers * sizeof(shm_objbuf_t);
    out[SHM_GET_PICKLE_LEN] = o->pickle_len;
    out[SHM_GET_NBYTES] = o->nbytes;
    out[SHM_GET_FLAGS] = o->flags;
    out[SHM_GET_NBUFFERS] = o->nbuffers;
    const shm_objbuf_t *t = obj_table(o);
    uint64_t *pairs = out + SHM_GET_WORDS;
    for (uint32_t i = 0; i < o->nbuffers; i++) {
        pairs[2 * i] = t[i].address;
        pairs[2 * i + 1] = t[i].nbytes;
    }
}

static int get_locked(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id, const char *name,
                      uint64_t *out, uint32_t cap, void *dst, uint64_t dst_cap) {
    uint64_t off;
    shm_object_t *o;
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK) return rc;
    if (name) {
        out[SHM_GET_BIND_SEQ] = __atomic_load_n(&section(h)->bind_seq, __ATOMIC_ACQUIRE);
        int64_t address = names_find_address(h, name);
        if (address < 0) return (int)address;
        if (obj_find(h, (uint64_t)address, 0, &off, &o) != SHM_OK)
            return err_set(SHM_EINVAL, (uint64_t)address,
                           "the name '%s' is bound to a block that is not an object", name);
    } else if ((rc = obj_find(h, object, id, &off, &o)) != SHM_OK) {
        return rc;
    }
    if (o->flags & SHM_OBJ_DELETED) return gone(off + SHM_HDR, "it was deleted");
    if (o->nbuffers > cap)
        return err_set(SHM_EINVAL, cap, "room for %u buffers, the object has %u", cap, o->nbuffers);
    view_words(off, o, out);
    if (!o->nbuffers && o->pickle_len <= dst_cap) { /* obj_fits: the stream lies in the block */
        memcpy(dst, h->base + out[SHM_GET_PICKLE], o->pickle_len);
        return 1;
    }
    if (!holder_bit(o, slot)) holder_set(h, o, slot, 1);
    return 0;
}

int shm_object_get(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id, const char *name,
                   uint64_t *out, uint32_t cap, void *dst, uint64_t dst_cap) {
    SHM_GATE(h);
    memset(out, 0, SHM_GET_WORDS * sizeof *out);
    LOCKED(h, get_locked(h, slot, object, id, name, out, cap, dst, dst_cap));
}

/* handoff.c's read and release in one step (under the heap lock): copy the pickle stream of an
 * object slot holds and that has no out-of-band buffers to dst, then drop slot's hold, which
 * frees the object if nothing else holds it. */
int objects_take_stream(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id, void *dst,
                        uint64_t dst_cap) {
    uint64_t off;
    shm_object_t *o;
    int rc = obj_find(h, object, id, &off, &o);
    if (rc != SHM_OK) return rc;
    if (o->nbuffers || o->pickle_len > dst_cap || !holder_bit(o, slot))
        return err_set(SHM_EINVAL, object, "the object at %#llx cannot be taken as a stream",
                       (unsigned long long)object);
    memcpy(dst, h->base + off + SHM_HDR + sizeof *o, o->pickle_len);
    holder_set(h, o, slot, 0);
    rc = objects_settle(h, off, o);
    return rc < 0 ? rc : SHM_OK;
}

static int release_locked(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id) {
    uint64_t off;
    shm_object_t *o;
    int rc = obj_find(h, object, id, &off, &o);
    if (rc != SHM_OK) return rc;
    if (!holder_bit(o, slot))
        return err_set(SHM_ENOENT, object, "this process holds no reference on the object");
    holder_set(h, o, slot, 0);
    return objects_settle(h, off, o);
}

int shm_object_release(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    LOCKED(h, release_locked(h, slot, object, id));
}

static int own_locked(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id) {
    uint64_t off;
    shm_object_t *o;
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK || (rc = obj_find(h, object, id, &off, &o)) != SHM_OK) return rc;
    if (o->flags & SHM_OBJ_DELETED) return gone(object, "it was deleted");
    if (o->flags & SHM_OBJ_LENT)
        return err_set(SHM_EINVAL, object, "the object at %#llx is lent memory: it cannot be owned",
                       (unsigned long long)object);
    if (o->owner != (uint32_t)slot + 1) owner_set(h, o, (uint32_t)slot + 1);
    return SHM_OK;
}

int shm_object_own(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id) {
    SHM_GATE(h);
    LOCKED(h, own_locked(h, slot, object, id));
}

static int hold_locked(shm_handle_t *h, uint64_t object, int delta) {
    uint64_t off;
    shm_object_t *o;
    int rc = obj_find(h, object, 0, &off, &o);
    if (rc != SHM_OK) return rc;
    if (delta > 0) {
        if (o->flags & SHM_OBJ_DELETED) return gone(object, "it was deleted");
        if (o->holds == UINT32_MAX)
            return err_set(SHM_EFULL, object, "the object has too many anonymous holds");
        J(h, &o->holds);
        o->holds++;
        return SHM_OK;
    }
    if (!o->holds) return err_set(SHM_ENOENT, object, "the object has no anonymous hold to drop");
    J(h, &o->holds);
    o->holds--;
    return objects_settle(h, off, o);
}

int shm_object_hold(shm_handle_t *h, uint64_t object) {
    SHM_GATE(h);
    LOCKED(h, hold_locked(h, object, 1));
}

int shm_object_drop(shm_handle_t *h, uint64_t object) {
    SHM_GATE(h);
    LOCKED(h, hold_locked(h, object, -1));
}

/* ------------------------------------------------------------------ lent buffers */

/* Publish the header block at object (an unpublished object of slot's with one buffer, the block
 * the lender's array uses) and make it LENT: slot holds it by its bit and, for the array, as its
 * owner. */
static int lend_locked(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t *id_out) {
    int rc = publish_locked(h, slot, object, 0, id_out);
    if (rc != SHM_OK) return rc;
    shm_object_t *o = obj_of(h, object - SHM_HDR);
    J(h, &o->flags);
    o->flags |= SHM_OBJ_LENT;
    owner_set(h, o, (uint32_t)slot + 1);
    return SHM_OK;
}

int shm_object_lend(shm_handle_t *h, int32_t slot, const void *pickle, uint64_t pickle_len,
                    uint64_t address, uint64_t nbytes, uint64_t *out) {
    SHM_GATE(h);
    int rc = create_check(h, slot, pickle_len, 1);
    if (rc != SHM_OK) return rc;
    int64_t r = alloc_checked(h, sizeof(shm_object_t) + sizeof(shm_objbuf_t) + pickle_len, 0, slot);
    if (r < 0) return (int)r;
    uint64_t object = (uint64_t)r & SHM_ALLOC_ADDRESS_MASK;
    shm_object_t *o = (shm_object_t *)(void *)(h->base + object);
    memset(o, 0, sizeof *o);
    o->nbuffers = 1;
    o->pickle_len = pickle_len;
    o->nbytes = pickle_len + nbytes;
    obj_table(o)[0].address = address;
    obj_table(o)[0].nbytes = nbytes;
    if (pickle_len) memcpy(obj_table(o) + 1, pickle, pickle_len);
    uint64_t id = 0;
    if ((rc = heap_lock(h)) == SHM_OK) { /* publish checks that address is a block of slot's */
        rc = lend_locked(h, slot, object, &id);
        heap_unlock(h);
    }
    if (rc != SHM_OK) {
        objects_discard(h, object, 0, NULL);
        return rc;
    }
    out[0] = object;
    out[1] = id;
    return SHM_OK;
}

static int unlend_locked(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id) {
    uint64_t off;
    shm_object_t *o;
    int rc = obj_find(h, object, id, &off, &o);
    if (rc != SHM_OK) return rc;
    if (!(o->flags & SHM_OBJ_LENT) || o->owner != (uint32_t)slot + 1)
        return err_set(SHM_ENOENT, object, "the object at %#llx is not lent by slot %d",
                       (unsigned long long)object, slot);
    J(h, &o->flags);
    o->flags &= ~(uint32_t)SHM_OBJ_LENT;
    owner_set(h, o, 0);
    return objects_settle(h, off, o);
}

int shm_object_unlend(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    LOCKED(h, unlend_locked(h, slot, object, id));
}

/* ------------------------------------------------------------------ tickets */

static shm_ticket_t *ticket_of(shm_handle_t *h, uint64_t address) {
    return (shm_ticket_t *)(void *)(h->base + address);
}

/* The ticket at address with that id, or NULL. */
static shm_ticket_t *ticket_find(shm_handle_t *h, uint64_t address, uint64_t id) {
    uint64_t off;
    if (!address || block_from_address(h, address, &off) != SHM_OK) return NULL;
    if (!(block_at(h, off)->flags & SHM_BF_OBJPART) ||
        block_at(h, off)->size - SHM_HDR < sizeof(shm_ticket_t))
        return NULL;
    shm_ticket_t *t = ticket_of(h, address);
    return t->magic == SHM_TICKET_MAGIC && t->id == id ? t : NULL;
}

static int ticket_link_ok(shm_handle_t *h, uint64_t address) {
    uint64_t off;
    return !address || (block_from_address(h, address, &off) == SHM_OK &&
                        (block_at(h, off)->flags & SHM_BF_OBJPART) &&
                        ticket_of(h, address)->magic == SHM_TICKET_MAGIC);
}

/* Take the ticket at address off the list and free its block; its hold is the caller's. */
static int ticket_remove(shm_handle_t *h, uint64_t address) {
    shm_objects_t *s = section(h);
    shm_ticket_t *t = ticket_of(h, address);
    if (!ticket_link_ok(h, t->next) || !ticket_link_ok(h, t->prev))
        return err_set(SHM_ECORRUPT, address, "[T1] the ticket list at %#llx is damaged",
                       (unsigned long long)address);
    if (t->next) {
        J(h, &ticket_of(h, t->next)->prev);
        ticket_of(h, t->next)->prev = t->prev;
    }
    uint64_t *link = t->prev ? &ticket_of(h, t->prev)->next : &s->ticket_head;
    J(h, link);
    *link = t->next;
    J(h, &s->tickets);
    if (s->tickets) s->tickets--;
    J(h, &t->magic);
    t->magic = 0;
    return obj_block_free(h, address - SHM_HDR, NULL);
}

static int issue_locked(shm_handle_t *h, uint64_t object, uint64_t id, uint64_t *ticket_out,
                        uint64_t *ticket_id_out) {
    uint64_t off, toff;
    shm_object_t *o;
    int rc = obj_find(h, object, id, &off, &o);
    if (rc != SHM_OK) return rc;
    if (o->flags & SHM_OBJ_DELETED) return gone(object, "it was deleted");
    if (o->holds == UINT32_MAX)
        return err_set(SHM_EFULL, object, "the object has too many references in transit");
    uint64_t need = SHM_HDR + sizeof(shm_ticket_t);
    rc = heap_carve(h, need < SHM_MIN_BLOCK ? SHM_MIN_BLOCK : need, 0, 0,
                    SHM_BF_PERSIST | SHM_BF_OBJPART, UINT64_MAX, &toff);
    if (rc == SHM_ENOMEM || rc == SHM_ENOSPC) return alloc_oom_report(h, sizeof(shm_ticket_t));
    if (rc != SHM_OK) return rc;
    A_ADD(&h->arena->counters.allocations, 1);
    heap_note_peak(h, -1);
    pressure_update(h, NULL);
    shm_objects_t *s = section(h);
    uint64_t timeout = s->transit_timeout_ns ? s->transit_timeout_ns : DEFAULT_TRANSIT_NS;
    uint64_t address = toff + SHM_HDR;
    shm_ticket_t *t = ticket_of(h, address);
    J(h, t);
    t->magic = SHM_TICKET_MAGIC;
    t->id = next_id(h);
    t->object = object;
    t->object_id = o->id;
    t->deadline_ns = now_ns() + timeout;
    t->prev = 0;
    t->next = s->ticket_head;
    if (t->next) {
        J(h, &ticket_of(h, t->next)->prev);
        ticket_of(h, t->next)->prev = address;
    }
    J(h, &s->ticket_head);
    J(h, &s->tickets);
    s->ticket_head = address;
    s->tickets++;
    J(h, &o->holds);
    o->holds++;
    *ticket_out = address;
    *ticket_id_out = t->id;
    return SHM_OK;
}

int shm_ticket_issue(shm_handle_t *h, uint64_t object, uint64_t id, uint64_t *ticket_out,
                     uint64_t *ticket_id_out) {
    SHM_GATE(h);
    LOCKED(h, issue_locked(h, object, id, ticket_out, ticket_id_out));
}

static int claim_locked(shm_handle_t *h, int32_t slot, uint64_t ticket, uint64_t ticket_id,
                        uint64_t object, uint64_t id) {
    uint64_t off;
    shm_object_t *o;
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK || (rc = obj_find(h, object, id, &off, &o)) != SHM_OK) return rc;
    shm_ticket_t *t = ticket_find(h, ticket, ticket_id);
    int claimed = t && t->object == object && t->object_id == o->id;
    if (!claimed && (o->flags & SHM_OBJ_DELETED)) return gone(object, "it was deleted");
    if (!holder_bit(o, slot)) holder_set(h, o, slot, 1);
    if (!claimed) return 0;
    if ((rc = ticket_remove(h, ticket)) != SHM_OK) return rc;
    J(h, &o->holds);
    if (o->holds) o->holds--;
    return 1;
}

int shm_ticket_claim(shm_handle_t *h, int32_t slot, uint64_t ticket, uint64_t ticket_id,
                     uint64_t object, uint64_t id) {
    SHM_GATE(h);
    LOCKED(h, claim_locked(h, slot, ticket, ticket_id, object, id));
}

/* Drop the tickets that expired (all: every ticket naming object, if object != 0). */
static int64_t tickets_drop(shm_handle_t *h, uint64_t object) {
    shm_objects_t *s = section(h);
    uint64_t now = now_ns(), n = 0, seen = 0;
    for (uint64_t a = s->ticket_head; a;) {
        if (!ticket_link_ok(h, a) || ++seen > SHM_WALK_LIMIT)
            return err_set(SHM_ECORRUPT, a, "[T1] the ticket list is damaged at %#llx",
                           (unsigned long long)a);
        shm_ticket_t *t = ticket_of(h, a);
        uint64_t next = t->next, target = t->object, target_id = t->object_id;
        if (object ? target != object : t->deadline_ns > now) {
            a = next;
            continue;
        }
        int rc = ticket_remove(h, a);
        if (rc != SHM_OK) return rc;
        uint64_t off;
        shm_object_t *o;
        if (obj_find(h, target, target_id, &off, &o) == SHM_OK && o->holds) {
            J(h, &o->holds);
            o->holds--;
            if (!object && (rc = objects_settle(h, off, o)) < 0) return rc;
        }
        journal_checkpoint(h);
        n++;
        a = next;
    }
    return (int64_t)n;
}

int64_t shm_objects_expire(shm_handle_t *h) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    int64_t n = tickets_drop(h, 0);
    heap_unlock(h);
    return n;
}

static int delete_locked(shm_handle_t *h, uint64_t object, uint64_t id) {
    uint64_t off;
    shm_object_t *o;
    int rc = obj_find(h, object, id, &off, &o);
    if (rc != SHM_OK) return rc;
    J(h, &o->flags);
    o->flags |= SHM_OBJ_DELETED;
    int64_t n = tickets_drop(h, object);
    if (n < 0) return (int)n;
    J(h, &o->holds); /* queue slots and handles too: their later drop finds SHM_ENOENT */
    o->holds = 0;
    if (o->owner && !(o->flags & SHM_OBJ_LENT)) owner_set(h, o, 0); /* a lender's array reads it */
    if (block_at(h, off)->flags & SHM_BF_NAMED) {
        names_drop_address(h, object);
        if ((rc = block_claim(h, off)) != SHM_OK) return rc;
        block_edit(h, off)->flags &= ~(uint32_t)SHM_BF_NAMED;
        block_reseal(h, off);
    }
    return objects_settle(h, off, o);
}

int shm_object_delete(shm_handle_t *h, uint64_t object, uint64_t id) {
    SHM_GATE(h);
    LOCKED(h, delete_locked(h, object, id));
}

/* ------------------------------------------------------------------ collection */

/* shm_gc's first step: clear the bits of DEAD slots (slot < 0: all, else that one), finish the
 * objects whose freeing was interrupted, drop expired tickets. Walks the heap only when a dead
 * slot holds objects or an object is DYING. */
int objects_collect(shm_handle_t *h, int32_t slot) {
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    shm_arena_t *a = h->arena;
    uint64_t dead[SHM_HOLDER_WORDS] = {0};
    int any = a->objects.dying != 0;
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (a->procs[i].state == SHM_PROC_DEAD && (slot < 0 || slot == i) && a->objects.held[i]) {
            dead[i / 64] |= (uint64_t)1 << (i % 64);
            any = 1;
        }
    for (uint64_t off = h->heap_off; any && off < h->heap_end && rc == SHM_OK;) {
        if (block_validate(h, off) != SHM_OK) {
            rc = SHM_ECORRUPT;
            break;
        }
        const shm_block_t *b = block_at(h, off);
        uint64_t end = off + b->size;
        shm_object_t *o = obj_of(h, off);
        if ((b->flags & SHM_BF_OBJECT) && b->size - SHM_HDR >= sizeof *o && obj_fits(h, off, o) &&
            (o->magic == SHM_OBJECT_MAGIC || o->magic == SHM_OBJECT_DYING)) {
            for (int i = 0; i < SHM_MAX_PROCS; i++)
                if (((dead[i / 64] >> (i % 64)) & 1) && holder_bit(o, i)) holder_set(h, o, i, 0);
            if (o->owner >= 1 && o->owner <= SHM_MAX_PROCS &&
                ((dead[(o->owner - 1) / 64] >> ((o->owner - 1) % 64)) & 1)) {
                J(h, &o->flags); /* a lender's array died with it */
                o->flags &= ~(uint32_t)SHM_OBJ_LENT;
                owner_set(h, o, 0);
            }
            if (o->magic == SHM_OBJECT_DYING || obj_unheld(h, off, o)) rc = obj_free(h, off, &end);
            journal_checkpoint(h);
        }
        off = end;
    }
    for (int i = 0; i < SHM_MAX_PROCS && rc == SHM_OK && any; i++)
        if ((dead[i / 64] >> (i % 64)) & 1) { /* every bit of it was cleared in the walk */
            J(h, &a->objects.held[i]);
            a->objects.held[i] = 0;
        }
    if (rc == SHM_OK) {
        int64_t n = tickets_drop(h, 0);
        if (n < 0) rc = (int)n;
    }
    heap_unlock(h);
    return rc;
}

/* ------------------------------------------------------------------ settings and counts */

int shm_objects_set_transit_timeout(shm_handle_t *h, uint64_t ns) {
    SHM_GATE(h);
    if (!ns) return err_set(SHM_EINVAL, 0, "the transit timeout must be positive");
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    J(h, &section(h)->transit_timeout_ns);
    section(h)->transit_timeout_ns = ns;
    heap_unlock(h);
    return SHM_OK;
}

int shm_objects_info(shm_handle_t *h, int32_t slot, shm_objects_info_t *out) {
    SHM_GATE(h);
    const shm_objects_t *s = section(h);
    out->live = A_LOAD(&s->live);
    out->tickets = A_LOAD(&s->tickets);
    out->dying = A_LOAD(&s->dying);
    uint64_t t = A_LOAD(&s->transit_timeout_ns);
    out->transit_timeout_ns = t ? t : DEFAULT_TRANSIT_NS;
    out->held = slot >= 0 && slot < SHM_MAX_PROCS ? A_LOAD(&s->held[slot]) : 0;
    return SHM_OK;
}

uint64_t shm_bind_seq_offset(void) { return offsetof(shm_arena_t, objects.bind_seq); }

/* ------------------------------------------------------------------ queue.c's door */

int objects_find(shm_handle_t *h, uint64_t object, uint64_t id, uint64_t *off, shm_object_t **out) {
    return obj_find(h, object, id, off, out);
}

int objects_publish_locked(shm_handle_t *h, int32_t slot, uint64_t object, int writable,
                           uint64_t *id_out) {
    return publish_locked(h, slot, object, writable, id_out);
}

int objects_open_found(shm_handle_t *h, int32_t slot, uint64_t off, shm_object_t *o,
                       shm_object_view_t *out, uint64_t *bufs, uint32_t cap) {
    return open_found(h, slot, off, o, out, bufs, cap);
}

void objects_holder_set(shm_handle_t *h, shm_object_t *o, int32_t slot, int on) {
    holder_set(h, o, slot, on);
}
