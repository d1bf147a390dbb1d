/* fastcall.h -- what the two files of the module shmalloc._fastcall share (not the core's).
 *
 * fastcall.c holds the module, the core's table and the Port; halves.c the C halves of three
 * Python classes (Fields, Manager, QueueBase). Nothing here is visible outside the module. */
#ifndef SHMALLOC_FASTCALL_H
#define SHMALLOC_FASTCALL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "shm_layout.h"
#include "shm_api.h"

#define FC_HIDDEN __attribute__((visibility("hidden")))

#define STREAM_COPY_MAX (64 << 10) /* a take copies a buffer-less stream up to this size */
/* The first byte of a value's stream that this module makes and reads itself (shmalloc.encoding
 * reads them too; their one definition): a bytes value's (the bytes follow), or a marshalled
 * one's (fc_marshallable; marshal's format, version MARSHAL_VERSION, follows). A pickle stream
 * starts with 0x80, an array's with 0. */
#define BYTES_MARK 1
#define MARSHAL_MARK 2
/* Version 2 keeps no references (an object written twice is written whole twice, which
 * MARSHAL_MAX bounds); version 3's cost a table per call. Every Python 3 reads it. */
#define MARSHAL_VERSION 2
/* The longest marshalled stream (fc_marshallable), its mark not counted. */
#define MARSHAL_MAX 1024
#define WAIT_RAISED INT32_MIN /* fc_wait_word(): a signal handler raised */

/* fc_take()'s answers: (TAKE_*, payload) */
enum { TAKE_VALUE, TAKE_STREAM, TAKE_EMPTY, TAKE_VIEW, TAKE_REF, TAKE_HELD };

/* The core functions, from the addresses bind() is given (shmalloc/_binding.py). */
struct fc_core {
    __typeof__(&shm_alloc) alloc;
    __typeof__(&shm_free) free;
    __typeof__(&shm_queue_put_new) put_new;
    __typeof__(&shm_queue_take) take;
    __typeof__(&shm_queue_wait) wait;
};
extern FC_HIDDEN struct fc_core fc_core;

/* The core call `call`, without the GIL. */
#define UNLOCKED(call)          \
    do {                        \
        Py_BEGIN_ALLOW_THREADS; \
        call;                   \
        Py_END_ALLOW_THREADS;   \
    } while (0)

/* 1 if this is the only Python thread of the only interpreter. The lists change under the
 * runtime's own lock, not the GIL: a thread being added as this reads them waits for the GIL. */
static inline int fc_only_thread(void) {
    PyInterpreterState *first = PyInterpreterState_Head();
    return first && !PyInterpreterState_Next(first) &&
           !PyThreadState_Next(PyInterpreterState_ThreadHead(first));
}

/* The core call `call`, without the GIL unless this is the only Python thread. */
#define CALL(call)              \
    do {                        \
        if (fc_only_thread()) { \
            call;               \
        } else {                \
            UNLOCKED(call);     \
        }                       \
    } while (0)

/* One process's handle to one arena (fastcall.c). */
typedef struct {
    PyObject_HEAD PyObject *keep; /* the cffi handle object, whose memory h is */
    shm_handle_t *h;
} Port;
extern FC_HIDDEN PyTypeObject PortType;

/* A queue's (slot, queue, queue_id): where an item goes or comes from, and for whom. */
typedef struct {
    int32_t slot;
    uint64_t queue, qid;
} Place;

/* A queue's core calls (fastcall.c), as the Port's methods make them. */
FC_HIDDEN int fc_marshallable(PyObject *value);
FC_HIDDEN PyObject *fc_put_value(Port *self, const Place *at, PyObject *value);
FC_HIDDEN PyObject *fc_put_new(Port *self, const Place *at, PyObject *stream, PyObject *list);
FC_HIDDEN PyObject *fc_take(Port *self, const Place *at, int copy_only, long *code);
FC_HIDDEN int fc_wait_word(Port *self, uint64_t control, int32_t which, uint32_t seq, long long ns);
FC_HIDDEN int fc_nargs_are(const char *name, Py_ssize_t n, Py_ssize_t want);

/* halves.c: the types ready, their names interned and added to the module; 0 or -1. */
FC_HIDDEN int fc_halves_ready(PyObject *module);
FC_HIDDEN PyObject *fc_bind_queues(PyObject *module, PyObject *const *args, Py_ssize_t n);

#endif
