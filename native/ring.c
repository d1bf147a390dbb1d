/* ring.c -- the bounded lock-free event ring (a multi-producer, multi-consumer queue of
 * sequence-numbered cells, after Dmitry Vyukov's bounded MPMC queue).
 *
 * Cell i starts with seq == i. A producer claims position pos by CAS on head when the cell's
 * seq == pos, fills it, then publishes seq = pos + 1 (release). A consumer takes position pos when
 * seq == pos + 1, copies it, then frees the cell for the next lap with seq = pos + SLOTS. A full
 * ring (seq < pos) makes a producer count the event in `dropped` and return: producers never wait.
 * A producer killed between its claim and its publish leaves a cell that consumers see as "not
 * yet published"; shm_event_pop retires such a cell once producers have moved
 * half a ring past it (and counts it in `dropped`), and a writer that publishes too late finds its
 * cell retired (a CAS on seq decides between the two) and returns SHM_EFULL. C never pushes events
 * itself: the kinds and their fields are shmalloc/events.py's table. */
#include <string.h>

#include "shm_internal.h"

#define MASK (SHM_RING_SLOTS - 1)
#define MAX_SPINS 1024 /* a ring whose numbers never line up is damaged: give up, do not spin */
_Static_assert((SHM_RING_SLOTS & MASK) == 0, "ring size is a power of two");

/* The event was not stored (it is counted in `dropped`): the ring is full. */
static int ring_dropped(shm_handle_t *h, const char *why) {
    return err_set(SHM_EFULL, (uint64_t)((uint8_t *)&h->arena->ring - h->base),
                   "the event ring is full (%d events, SHM_RING_SLOTS; %s): the event was dropped; "
                   "drain the ring more often (a coordinator does)",
                   SHM_RING_SLOTS, why);
}

/* Claim the next position of *counter (head for a producer, tail for a consumer) whose cell is
 * ready for it: its seq is pos + lag (0: a free cell, for a producer; 1: a published one, for a
 * consumer). 1 and the position in *pos once claimed; 0 and the position when that cell is not
 * ready; -1 when the numbers never line up (a damaged ring). */
static int ring_claim(shm_ring_t *r, uint64_t *counter, uint64_t lag, uint64_t *pos) {
    *pos = __atomic_load_n(counter, __ATOMIC_RELAXED);
    for (int spins = 0; spins < MAX_SPINS; spins++) {
        uint64_t seq = __atomic_load_n(&r->slots[*pos & MASK].seq, __ATOMIC_ACQUIRE);
        int64_t dif = (int64_t)(seq - (*pos + lag));
        if (dif == 0 && __atomic_compare_exchange_n(counter, pos, *pos + 1, 1, __ATOMIC_RELAXED,
                                                    __ATOMIC_RELAXED))
            return 1;
        if (dif < 0) return 0;
        if (dif > 0) *pos = __atomic_load_n(counter, __ATOMIC_RELAXED);
    }
    return -1;
}

static int ring_damaged(shm_handle_t *h) {
    return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)&h->arena->ring - h->base),
                   "the event ring's sequence numbers are damaged");
}

int shm_event_push(shm_handle_t *h, uint32_t kind, uint32_t pid, uint64_t time_ns, uint64_t f0,
                   uint64_t f1, uint64_t f2, uint64_t f3, uint64_t f4) {
    SHM_GATE(h);
    shm_ring_t *r = &h->arena->ring;
    uint64_t pos;
    int got = ring_claim(r, &r->head, 0, &pos);
    if (got <= 0) {
        __atomic_add_fetch(&r->dropped, 1, __ATOMIC_RELAXED);
        return got ? ring_damaged(h) : ring_dropped(h, "no cell was free");
    }
    shm_event_t *cell = &r->slots[pos & MASK];
    cell->kind = kind;
    cell->pid = pid;
    cell->time_ns = time_ns;
    cell->f[0] = f0, cell->f[1] = f1, cell->f[2] = f2, cell->f[3] = f3, cell->f[4] = f4;
    /* publish, unless a consumer gave this cell up for dead meanwhile */
    uint64_t expect = pos;
    if (__atomic_compare_exchange_n(&cell->seq, &expect, pos + 1, 0, __ATOMIC_RELEASE,
                                    __ATOMIC_RELAXED))
        return SHM_OK;
    return ring_dropped(h, "a consumer gave up waiting for it");
}

/* 1 and the event in *out, or 0 when nothing is ready. */
int shm_event_pop(shm_handle_t *h, shm_event_t *out) {
    SHM_GATE(h);
    shm_ring_t *r = &h->arena->ring;
    for (int retired = 0; retired < MAX_SPINS; retired++) {
        uint64_t pos;
        int got = ring_claim(r, &r->tail, 1, &pos);
        if (got < 0) break;
        shm_event_t *cell = &r->slots[pos & MASK];
        if (got) {
            memcpy(out, cell, sizeof *out);
            __atomic_store_n(&cell->seq, pos + SHM_RING_SLOTS, __ATOMIC_RELEASE);
            return 1;
        }
        if (__atomic_load_n(&r->head, __ATOMIC_RELAXED) - pos <= SHM_RING_SLOTS / 2)
            return 0; /* empty, or the next is being written */
        /* a claimed cell far behind the producers: its writer died (or stalls); retire it.
         * The CAS on seq races the writer's publishing CAS: exactly one of them wins. */
        uint64_t expect = pos;
        if (__atomic_compare_exchange_n(&cell->seq, &expect, pos + SHM_RING_SLOTS, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            __atomic_add_fetch(&r->dropped, 1, __ATOMIC_RELAXED);
            __atomic_compare_exchange_n(&r->tail, &pos, pos + 1, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED);
        }
    }
    return ring_damaged(h);
}

uint64_t shm_event_dropped(shm_handle_t *h) {
    shm_handle_t *held __attribute__((cleanup(gate_leave))) = gate_enter(h);
    return held ? __atomic_load_n(&h->arena->ring.dropped, __ATOMIC_RELAXED) : 0; /* 0: closed */
}
