/* handoff.c -- the combined calls of a hand-off: put, Queue.put and Queue.get, one C call each.
 *
 * Measured from Python, a hand-off cost about a hundred Python-level calls, nine in ten of its
 * time, around a few microseconds of C (objects.c, queue.c). The calls here do in C what Python
 * did between those calls: allocate the blocks of a new object, copy its pickle stream and its
 * out-of-band buffers in, publish it (or put it in a queue); take an item out of a queue and, when
 * it is small and has no buffers, copy its stream out and drop it in the same call (read and
 * free). They add no state and no lock of their own: each is a sequence of the steps objects.c
 * and queue.c already make safe, so what a process killed inside one leaves behind is what it
 * leaves after those steps (objects.c's and queue.c's essays):
 *   - killed while allocating or copying (fault step object.filled: all written, nothing
 *     published): plain blocks owned by its slot, which collection frees; nothing refers to them;
 *   - killed inside the publish or the queue's put: the journaled step is rolled back, so the same;
 *   - killed after it: a published object held by the dead slot (collection drops the hold), or
 *     an item in the queue (the put is done);
 *   - in a take of an item copied out, killed after the get's step and before the copy's (both
 *     under one hold of the heap lock, a checkpoint between them): the item is held by the dead
 *     slot, delivered once, to the dead, and collection frees it; killed after them
 * (queue.get.done) it is delivered and freed. The arguments are checked once, here or by the steps'
 * own checks; the copies run without the heap lock (the blocks are the caller's own until
 * published) and, from Python, without the GIL. Every entry point passes the gate (SHM_GATE): close
 * never unmaps the segment under a copy. */
#include <string.h>

#include "shm_internal.h"

/* A new unpublished object of slot's with the stream and the buffers copied in (out as
 * shm_object_create's). */
static int fill_new(shm_handle_t *h, int32_t slot, const void *pickle, uint64_t pickle_len,
                    uint32_t nbuffers, const void *const *bufs, const uint64_t *sizes,
                    uint64_t *out) {
    int rc = objects_create(h, slot, pickle_len, nbuffers, sizes, out);
    if (rc != SHM_OK) return rc;
    if (pickle_len) memcpy(h->base + out[1], pickle, pickle_len);
    for (uint32_t i = 0; bufs && i < nbuffers; i++)
        if (bufs[i] && sizes[i]) copy_in(h->base + out[2 + i], bufs[i], sizes[i]);
    FAULT_POINT(FAULT_OBJECT_FILLED);
    return SHM_OK;
}

int shm_object_put(shm_handle_t *h, int32_t slot, const void *pickle, uint64_t pickle_len,
                   uint32_t nbuffers, const void *const *bufs, const uint64_t *sizes, int writable,
                   uint64_t *out) {
    SHM_GATE(h);
    int rc = fill_new(h, slot, pickle, pickle_len, nbuffers, bufs, sizes, out);
    if (rc != SHM_OK) return rc;
    uint64_t id = 0;
    if ((rc = heap_lock(h)) == SHM_OK) {
        rc = objects_publish_locked(h, slot, out[0], writable, &id);
        heap_unlock(h);
    }
    if (rc != SHM_OK) {
        objects_discard(h, out[0], nbuffers, out + 2);
        return rc;
    }
    out[1] = id;
    return SHM_OK;
}

int shm_queue_put_new(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id,
                      const void *pickle, uint64_t pickle_len, uint32_t nbuffers,
                      const void *const *bufs, const uint64_t *sizes, uint64_t *out,
                      uint32_t *seq_out) {
    SHM_GATE(h);
    int rc = fill_new(h, slot, pickle, pickle_len, nbuffers, bufs, sizes, out);
    if (rc != SHM_OK) return rc;
    rc = shm_queue_put(h, slot, queue, queue_id, out[0], 0, SHM_QPUT_NEW, seq_out);
    if (rc != SHM_OK && rc != SHM_QPUT_FULL) objects_discard(h, out[0], nbuffers, out + 2);
    return rc;
}

int shm_queue_take(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id, uint64_t *out,
                   uint32_t cap, void *dst, uint64_t dst_cap, int copy_only, uint32_t *seq_out) {
    SHM_GATE(h);
    shm_object_view_t v;
    int rc = queue_take(h, slot, queue, queue_id, &v, out + SHM_GET_WORDS, cap, dst, dst_cap,
                        copy_only, seq_out);
    memset(out, 0, SHM_GET_WORDS * sizeof *out);
    if (rc != SHM_QGET_VALUE && rc != SHM_QGET_REF && rc != SHM_QGET_COPIED) return rc;
    out[SHM_GET_ADDRESS] = v.address;
    out[SHM_GET_ID] = v.id;
    out[SHM_GET_PICKLE] = v.pickle;
    out[SHM_GET_PICKLE_LEN] = v.pickle_len;
    out[SHM_GET_NBYTES] = v.nbytes;
    out[SHM_GET_FLAGS] = v.flags;
    out[SHM_GET_NBUFFERS] = v.nbuffers;
    return rc;
}
