/* lease.c -- the coordinator's lease: (pid, start time) of the process that holds the role.
 *
 * One coordinator at a time watches an arena. Whether a holder is alive is decided in Python (it
 * compares pid and start time); the swap here only succeeds from the expected holder, so two
 * contenders cannot both take over from the same dead one. Under the heap lock, journaled. */
#include "shm_internal.h"

int shm_lease_get(shm_handle_t *h, uint64_t *pid, uint64_t *start_time) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    *pid = h->arena->lease.pid;
    *start_time = h->arena->lease.start_time;
    heap_unlock(h);
    return SHM_OK;
}

int shm_lease_swap(shm_handle_t *h, uint64_t old_pid, uint64_t old_start, uint64_t new_pid,
                   uint64_t new_start) {
    SHM_GATE(h);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    shm_lease_t *l = &h->arena->lease;
    int swapped = 0;
    if (l->pid == old_pid && l->start_time == old_start) {
        J(h, l);
        l->pid = new_pid;
        l->start_time = new_start;
        swapped = 1;
    }
    heap_unlock(h);
    return swapped;
}
