/* fault.c -- test-only fault injection at named steps inside the C core.
 *
 * SHMALLOC_FAULT=<step> in the environment (read once, when the first handle is opened) makes the
 * process SIGKILL itself when it reaches that step, so tests hit a critical window exactly.
 * Compiled in always; costs one predictable branch per step when unset. Steps:
 *   alloc.locked   right after taking the heap lock in shm_alloc, before any change
 *   free.locked    right after taking the heap lock in shm_free, before any change */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shm_internal.h"

int fault_step = -1;

static const char *const steps[] = {[FAULT_ALLOC_LOCKED] = "alloc.locked",
                                    [FAULT_FREE_LOCKED] = "free.locked"};

void fault_init(void) {
    static int done;
    if (done) return;
    done = 1;
    const char *want = getenv("SHMALLOC_FAULT");
    if (!want) return;
    for (int i = 0; i < (int)(sizeof steps / sizeof steps[0]); i++)
        if (strcmp(want, steps[i]) == 0) fault_step = i;
}

void fault_fire(void) { kill(getpid(), SIGKILL); }
