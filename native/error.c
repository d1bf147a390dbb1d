/* error.c -- the calling thread's last error, and the one table of status messages.
 *
 * C never raises: it records what went wrong here and returns a negative status. The Python
 * binding (shmalloc/_binding.py) reads shm_last_error() and maps the status to an exception. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shm_internal.h"

static __thread shm_error_info_t last_error;

static const char *const messages[] = {
    [0] = "ok",
    [1] = "the arena has no free block large enough",
    [2] = "the backing tmpfs (/dev/shm) has no pages left",
    [3] = "not the address of a live block of this arena",
    [4] = "a structure in the segment is corrupt",
    [5] = "alignment must be a power of two up to 4096",
    [6] = "the block is sealed",
    [7] = "the process limit would be exceeded",
    [8] = "an argument is out of range",
    [9] = "the process table is full",
    [10] = "a system call failed",
    [11] = "the segment is not an arena of this layout version",
    [12] = "the name is already bound",
    [13] = "no such name or reference",
    [14] = "a fixed table in the segment is full",
    [15] = "a lock is held by another thread or process",
    [16] = "the segment is not a shmalloc arena",
    [17] = "the arena is closed in this process",
    [18] = "the wait timed out",
    [19] = "the wait was interrupted by a signal",
};

const char *shm_strerror(int status) {
    int i = -status;
    if (i < 0 || i >= (int)(sizeof messages / sizeof messages[0])) return "unknown status";
    return messages[i];
}

const shm_error_info_t *shm_last_error(void) { return &last_error; }

static void err_reset(int status) {
    memset(&last_error, 0, sizeof last_error);
    last_error.status = status;
}

int err_set(int status, uint64_t offset, const char *fmt, ...) {
    err_reset(status);
    last_error.offset = offset;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error.detail, sizeof last_error.detail, fmt, ap);
    va_end(ap);
    return status;
}

int err_sys(int sys_errno, const char *what) {
    err_reset(SHM_ESYS);
    last_error.sys_errno = sys_errno;
    snprintf(last_error.detail, sizeof last_error.detail, "%s: %s", what, strerror(sys_errno));
    return SHM_ESYS;
}

/* A fresh record of status whose detail is status's own message (the fields say the rest). */
static void err_plain(int status) {
    err_reset(status);
    snprintf(last_error.detail, sizeof last_error.detail, "%s", shm_strerror(status));
}

int err_oom(int status, uint64_t requested, uint64_t available, uint64_t used, uint64_t total) {
    err_plain(status);
    last_error.requested = requested;
    last_error.available = available;
    last_error.used = used;
    last_error.total = total;
    return status;
}

/* A process limit: the amounts of err_oom() (none available, no total) and whose limit. */
int err_limit(uint32_t pid, uint64_t limit, uint64_t used, uint64_t requested) {
    err_oom(SHM_ELIMIT, requested, 0, used, 0);
    last_error.pid = pid;
    last_error.limit = limit;
    return SHM_ELIMIT;
}

/* SHM_EFULL for a fixed table of the segment: which one, its size and the constant that sets it,
 * what to do about it. */
int err_table_full(uint64_t offset, const char *table, int entries, const char *size_macro,
                   const char *advice) {
    return err_set(SHM_EFULL, offset, "%s is full: all %d entries (%s) are in use; %s", table,
                   entries, size_macro, advice);
}

/* Put back an error saved before cleanup calls that may have recorded their own. */
void err_restore(const shm_error_info_t *saved) { last_error = *saved; }

/* A debug build's assert failed (shm_internal.h): our own logic is wrong, not the segment. */
void shm_assert_fail(const char *what, const char *file, int line) {
    fprintf(stderr, "shmalloc: assertion failed: %s (%s:%d)\n", what, file, line);
    abort();
}
