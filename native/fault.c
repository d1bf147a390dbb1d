/* fault.c -- test-only fault injection at named steps inside the C core.
 *
 * SHMALLOC_FAULT=<step> in the environment (read once, when the first handle is opened) makes the
 * process SIGKILL itself when it reaches that step, so tests hit a critical window exactly.
 * Compiled in always; costs one predictable branch per step when unset. Steps:
 *   alloc.locked   right after taking the heap lock in shm_alloc, before any change
 *   alloc.removed  the chosen free block is off its list, nothing written yet
 *   alloc.carved   the new block's header is written, the tail not yet split off
 *   alloc.done     everything written but the counters
 *   free.locked    right after taking the heap lock in shm_free, before any change
 *   free.unlinked  the free neighbours are off their lists, the merged header not yet written
 *   free.inserted  the merged block is on its list, the counters not yet updated
 *   retain.half    the reference entry is taken, the block's refcount not yet raised
 *   gc.step        a collection has freed its first block and is about to free the next
 *   cache.popped   a cached block is off its list, not yet handed out (no heap lock held)
 *   cache.pushed   a freed block is marked CACHED, not yet on its list (no heap lock held)
 *   remote.claimed another process's block is marked REMOTE, not yet on its remote list
 *   queue.put.half the item is published and in its cell, the queue's head not yet advanced
 *   queue.put.done the put is done and the heap lock let go, sleeping getters not yet woken
 *   queue.get.half the consumer holds the item, its cell is empty, its hold not yet dropped
 *   queue.get.done the get is done and the heap lock let go, the item not yet back in Python
 *   queue.grow     a bigger ring is carved and filled, not yet in the queue
 *   queue.drain    a queue being freed has dropped an item, more are left
 *   object.filled  a put's blocks are allocated and written (handoff.c), not yet published
 *
 * With SHMALLOC_FAULT_PAUSE=<w>:<r> (two inherited descriptors) the step pauses instead: the first
 * thread to reach it writes one byte to descriptor w and blocks until it reads one from r, still
 * inside the step (holding whatever the step holds); later arrivals pass. A test then acts while
 * a real thread sits in the window, for as long as it needs, and lets it go. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shm_internal.h"

int fault_step = -1;
static int pause_w = -1, pause_r = -1; /* SHMALLOC_FAULT_PAUSE */

static const char *const steps[] = {
    [FAULT_ALLOC_LOCKED] = "alloc.locked",
    [FAULT_ALLOC_REMOVED] = "alloc.removed",
    [FAULT_ALLOC_CARVED] = "alloc.carved",
    [FAULT_ALLOC_DONE] = "alloc.done",
    [FAULT_FREE_LOCKED] = "free.locked",
    [FAULT_FREE_UNLINKED] = "free.unlinked",
    [FAULT_FREE_INSERTED] = "free.inserted",
    [FAULT_RETAIN_HALF] = "retain.half",
    [FAULT_GC_STEP] = "gc.step",
    [FAULT_CACHE_POPPED] = "cache.popped",
    [FAULT_CACHE_PUSHED] = "cache.pushed",
    [FAULT_REMOTE_CLAIMED] = "remote.claimed",
    [FAULT_QUEUE_PUT_HALF] = "queue.put.half",
    [FAULT_QUEUE_PUT_DONE] = "queue.put.done",
    [FAULT_QUEUE_GET_HALF] = "queue.get.half",
    [FAULT_QUEUE_GET_DONE] = "queue.get.done",
    [FAULT_QUEUE_GROW] = "queue.grow",
    [FAULT_QUEUE_DRAIN] = "queue.drain",
    [FAULT_OBJECT_FILLED] = "object.filled",
};

void fault_init(void) {
    static int done;
    if (done) return;
    done = 1;
    const char *want = getenv("SHMALLOC_FAULT");
    if (!want) return;
    for (int i = 0; i < (int)(sizeof steps / sizeof steps[0]); i++)
        if (strcmp(want, steps[i]) == 0) fault_step = i;
    const char *fds = getenv("SHMALLOC_FAULT_PAUSE");
    if (fds && sscanf(fds, "%d:%d", &pause_w, &pause_r) != 2) pause_w = pause_r = -1;
}

void fault_fire(void) {
    if (pause_w < 0) {
        kill(getpid(), SIGKILL);
        return;
    }
    static int paused;
    if (__atomic_exchange_n(&paused, 1, __ATOMIC_ACQ_REL)) return; /* only the first arrival */
    char c = 'p';
    ssize_t n;
    while ((n = write(pause_w, &c, 1)) < 0 && errno == EINTR) {}
    while ((n = read(pause_r, &c, 1)) < 0 && errno == EINTR) {}
}

int shm_fault_step_count(void) { return (int)(sizeof steps / sizeof steps[0]); }

const char *shm_fault_step_name(int index) {
    return index >= 0 && index < shm_fault_step_count() ? steps[index] : NULL;
}
