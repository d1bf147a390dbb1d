/* fastcall.c -- the module shmalloc._fastcall: the hand-off's hottest calls as CPython methods.
 *
 * The C core is compiled once, into shmalloc._native (cffi, build_ffi.py). A cffi call converts
 * each argument through cffi's generic machinery (a pointer argument alone costs about as much
 * as the allocation it asks for), releases and retakes the GIL, and leaves Python to turn the
 * out-parameters into objects. This module calls the same core functions, found through the
 * addresses that bind() is given once (cffi's ffi.addressof, shmalloc/_binding.py), with
 * METH_FASTCALL methods of three types:
 *   Port       one process's handle to one arena: a queue's put, take and wait, all arguments
 *              given (the Python halves' calls);
 *   Fields     the C base of an Attachment: its port, slot and collector, as C members;
 *   Manager    the C base of MemoryManager: allocate() and deallocate();
 *   QueueBase  the C base of the queues: put() and get(), their first attempt.
 * The last two do the common case and leave the rest to the Python methods of their subclasses.
 * It holds no state of the core's and adds no mechanism: each method is one core call and the
 * Python objects of its answer.
 *
 * A Port keeps the cffi handle object alive, so the handle's memory outlives any call made
 * through it (a caller holds a reference to the Port for the call); a call after close() meets
 * the core's gate (SHM_ECLOSED), as through cffi.
 *
 * A core call runs without the GIL, as cffi's do, whenever another Python thread exists (in any
 * interpreter): a call may wait for a lock that a stopped or paused process holds, and the other
 * threads must go on meanwhile. In a process whose only Python thread is this one, nobody could
 * use the GIL meanwhile, and letting it go and taking it back (two mutex round trips and a
 * condition signal, about 850 instructions) cost more than a small allocation: the call keeps it.
 * A thread started meanwhile from C waits for it until the call returns. A wait always lets it go.
 * A take copies into a buffer of its thread's own. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "shm_layout.h"
#include "shm_api.h"

#define STREAM_COPY_MAX (64 << 10) /* a take copies a buffer-less stream up to this size */
#define STACK_BUFFERS 8  /* a put of at most this many buffers keeps its arrays on the stack */
#define BYTES_MARK 1     /* first byte of a bytes value's stream (its one definition) */
#define STACK_STREAM 512 /* a bytes value up to this size is marked on the stack */
#define MAX_WAIT_NS (INT64_C(1) << 60) /* a longer wait is this one (36 years) */

/* take()'s answers: (TAKE_*, payload) */
enum { TAKE_BYTES, TAKE_STREAM, TAKE_EMPTY, TAKE_VIEW, TAKE_REF, TAKE_HELD };

static struct {
    __typeof__(&shm_alloc) alloc;
    __typeof__(&shm_free) free;
    __typeof__(&shm_queue_put_new) put_new;
    __typeof__(&shm_queue_take) take;
    __typeof__(&shm_queue_wait) wait;
} core;

/* The core call `call`, without the GIL. */
#define UNLOCKED(call)          \
    do {                        \
        Py_BEGIN_ALLOW_THREADS; \
        call;                   \
        Py_END_ALLOW_THREADS;   \
    } while (0)

/* 1 if this is the only Python thread of the only interpreter. The lists change under the
 * runtime's own lock, not the GIL: a thread being added as this reads them waits for the GIL. */
static int only_thread(void) {
    PyInterpreterState *first = PyInterpreterState_Head();
    return first && !PyInterpreterState_Next(first) &&
           !PyThreadState_Next(PyInterpreterState_ThreadHead(first));
}

/* The core call `call`, without the GIL unless this is the only Python thread. */
#define CALL(call)           \
    do {                     \
        if (only_thread()) { \
            call;            \
        } else {             \
            UNLOCKED(call);  \
        }                    \
    } while (0)

/* Each thread's buffer for the streams take() copies out (freed when the thread ends). */
static pthread_key_t take_key;

static char *take_buffer(void) {
    char *dst = pthread_getspecific(take_key);
    if (dst) return dst;
    if (!(dst = malloc(STREAM_COPY_MAX)) || pthread_setspecific(take_key, dst)) {
        free(dst);
        PyErr_NoMemory();
        return NULL;
    }
    return dst;
}

typedef struct {
    PyObject_HEAD PyObject *keep; /* the cffi handle object, whose memory h is */
    shm_handle_t *h;
} Port;

/* Arguments are exact ints in range (cffi's rules: OverflowError, TypeError otherwise). */
static int arg_int(PyObject *o) {
    if (PyLong_Check(o)) return 0;
    PyErr_Format(PyExc_TypeError, "an integer is required, not %.100s", Py_TYPE(o)->tp_name);
    return -1;
}

static int arg_u64(PyObject *o, uint64_t *out) {
    if (arg_int(o)) return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

static int arg_slot(PyObject *o, int32_t *out) {
    if (arg_int(o)) return -1;
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "slot out of range");
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

/* Port(handle, address): made once, never re-initialised, so h and keep stay fixed while calls
 * run without the GIL. */
static PyObject *port_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *keep, *at;
    uint64_t address;
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "Port() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO", &keep, &at) || arg_u64(at, &address)) return NULL;
    if (!address) {
        PyErr_SetString(PyExc_ValueError, "Port() needs the address of a handle, not 0");
        return NULL;
    }
    if (!core.alloc) {
        PyErr_SetString(PyExc_RuntimeError, "shmalloc._fastcall.bind() was not called");
        return NULL;
    }
    Port *self = (Port *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->keep = Py_NewRef(keep);
    self->h = (shm_handle_t *)(uintptr_t)address;
    return (PyObject *)self;
}

static void port_dealloc(Port *self) {
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int nargs_are(const char *name, Py_ssize_t n, Py_ssize_t want) {
    if (n == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, n);
    return -1;
}

/* What a put answers: None when the item is in; (the not_full word's value, [header, buffers...])
 * when the queue is full (the blocks made and left unpublished); a status (a negative int). */
static PyObject *put_answer(int rc, const uint64_t *out, uint32_t nbuffers, uint32_t seq) {
    if (rc == SHM_OK) Py_RETURN_NONE;
    if (rc != SHM_QPUT_FULL) return PyLong_FromLong(rc);
    PyObject *blocks = PyList_New(1 + (Py_ssize_t)nbuffers);
    if (!blocks) return NULL;
    for (uint32_t i = 0; i <= nbuffers; i++) {
        PyObject *at = PyLong_FromUnsignedLongLong(out[i ? 1 + i : 0]);
        if (!at) {
            Py_DECREF(blocks);
            return NULL;
        }
        PyList_SET_ITEM(blocks, i, at);
    }
    return Py_BuildValue("(kN)", (unsigned long)seq, blocks);
}

/* A queue's (slot, queue, queue_id): where an item goes or comes from, and for whom. */
typedef struct {
    int32_t slot;
    uint64_t queue, qid;
} Place;

static int place_args(PyObject *const *args, Place *at) {
    return arg_slot(args[0], &at->slot) || arg_u64(args[1], &at->queue) ||
                   arg_u64(args[2], &at->qid)
               ? -1
               : 0;
}

/* Queue.put() of a bytes value, its stream (BYTES_MARK and the bytes) made here. */
static PyObject *put_bytes(Port *self, const Place *at, PyObject *value) {
    uint64_t out[2];
    uint32_t seq = 0;
    Py_ssize_t len = PyBytes_GET_SIZE(value);
    char small[STACK_STREAM + 1];
    char *stream = len <= STACK_STREAM ? small : PyMem_RawMalloc((size_t)len + 1);
    if (!stream) return PyErr_NoMemory();
    stream[0] = BYTES_MARK;
    memcpy(stream + 1, PyBytes_AS_STRING(value), (size_t)len);
    int rc;
    CALL(rc = core.put_new(self->h, at->slot, at->queue, at->qid, stream, (uint64_t)len + 1, 0,
                           NULL, NULL, out, &seq));
    if (stream != small) PyMem_RawFree(stream);
    return put_answer(rc, out, 0, seq);
}

/* put_bytes(slot, queue, queue_id, value): put_bytes() above. Answers as put_new. */
static PyObject *port_put_bytes(Port *self, PyObject *const *args, Py_ssize_t n) {
    Place at;
    if (nargs_are("put_bytes", n, 4) || place_args(args, &at)) return NULL;
    if (!PyBytes_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "put_bytes() takes a bytes value");
        return NULL;
    }
    return put_bytes(self, &at, args[3]);
}

/* put_new(slot, queue, queue_id, stream, buffers): Queue.put() of a new item in one core call,
 * the pickle stream (bytes) and its out-of-band buffers (a list of contiguous buffers) made into
 * an object and put in the queue. None when it is in; (seq, blocks) when the queue is full; a
 * negative status. */
static PyObject *put_new(Port *self, const Place *at, PyObject *stream, PyObject *list) {
    uint32_t seq = 0;
    if (!PyBytes_CheckExact(stream) || !PyList_CheckExact(list)) {
        PyErr_SetString(PyExc_TypeError, "put_new() takes a bytes stream and a list of buffers");
        return NULL;
    }
    if (PyList_GET_SIZE(list) > SHM_OBJECT_MAX_BUFFERS) {
        PyErr_SetString(PyExc_ValueError, "too many out-of-band buffers");
        return NULL;
    }
    /* a snapshot: getting a buffer may run Python code, which may change the list */
    PyObject *items = PyList_AsTuple(list);
    if (!items) return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(items);
    Py_buffer stack_views[STACK_BUFFERS];
    const void *stack_ptrs[STACK_BUFFERS];
    uint64_t stack_sizes[STACK_BUFFERS], stack_out[2 + STACK_BUFFERS];
    Py_buffer *views = stack_views;
    const void **ptrs = stack_ptrs;
    uint64_t *sizes = stack_sizes, *out = stack_out;
    void *heap = NULL;
    if (nb > STACK_BUFFERS) {
        size_t each = sizeof(Py_buffer) + sizeof(void *) + 2 * sizeof(uint64_t);
        heap = PyMem_Malloc((size_t)nb * each + 2 * sizeof(uint64_t));
        if (!heap) {
            Py_DECREF(items);
            return PyErr_NoMemory();
        }
        views = heap;
        ptrs = (const void **)(views + nb);
        sizes = (uint64_t *)(ptrs + nb);
        out = sizes + nb;
    }
    PyObject *answer = NULL;
    Py_ssize_t got = 0;
    for (; got < nb; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(items, got), &views[got], PyBUF_SIMPLE)) goto done;
        ptrs[got] = views[got].buf;
        sizes[got] = (uint64_t)views[got].len;
    }
    int rc;
    CALL(rc = core.put_new(self->h, at->slot, at->queue, at->qid, PyBytes_AS_STRING(stream),
                           (uint64_t)PyBytes_GET_SIZE(stream), (uint32_t)nb, ptrs, sizes, out,
                           &seq));
    answer = put_answer(rc, out, (uint32_t)nb, seq);
done:
    while (got > 0) PyBuffer_Release(&views[--got]);
    PyMem_Free(heap);
    Py_DECREF(items);
    return answer;
}

static PyObject *port_put_new(Port *self, PyObject *const *args, Py_ssize_t n) {
    Place at;
    if (nargs_are("put_new", n, 5) || place_args(args, &at)) return NULL;
    return put_new(self, &at, args[3], args[4]);
}

/* (code, payload), the payload's reference stolen; NULL if either is NULL. */
static PyObject *pair(long code, PyObject *payload) {
    PyObject *t = payload ? PyTuple_New(2) : NULL;
    PyObject *c = t ? PyLong_FromLong(code) : NULL;
    if (!c) {
        Py_XDECREF(t);
        Py_XDECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, c);
    PyTuple_SET_ITEM(t, 1, payload);
    return t;
}

/* The view of a taken object: (address, id, pickle, pickle_len, nbytes, flags, ((address,
 * nbytes), ...)), the fields of shmalloc._binding.ObjectView in its order. */
static PyObject *view_tuple(const uint64_t *out) {
    uint64_t nb = out[SHM_GET_NBUFFERS];
    if (nb > SHM_OBJECT_MAX_BUFFERS) { /* (the core refuses more: never trust a count twice) */
        PyErr_SetString(PyExc_RuntimeError, "an object view with too many buffers");
        return NULL;
    }
    PyObject *bufs = PyTuple_New((Py_ssize_t)nb);
    if (!bufs) return NULL;
    for (uint64_t i = 0; i < nb; i++) {
        PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)out[SHM_GET_WORDS + 2 * i],
                                       (unsigned long long)out[SHM_GET_WORDS + 2 * i + 1]);
        if (!pair) {
            Py_DECREF(bufs);
            return NULL;
        }
        PyTuple_SET_ITEM(bufs, (Py_ssize_t)i, pair);
    }
    return Py_BuildValue(
        "(KKKKKKN)", (unsigned long long)out[SHM_GET_ADDRESS], (unsigned long long)out[SHM_GET_ID],
        (unsigned long long)out[SHM_GET_PICKLE], (unsigned long long)out[SHM_GET_PICKLE_LEN],
        (unsigned long long)out[SHM_GET_NBYTES], (unsigned long long)out[SHM_GET_FLAGS], bufs);
}

/* take(): the payload (a new reference, or NULL and an exception) and its TAKE_* code (or a
 * negative status) in *code. */
static PyObject *take(Port *self, const Place *at, int copy_only, long *code) {
    uint64_t out[SHM_GET_WORDS + 2 * SHM_OBJECT_MAX_BUFFERS];
    uint32_t seq = 0;
    char *dst = take_buffer();
    if (!dst) return NULL;
    int rc;
    CALL(rc = core.take(self->h, at->slot, at->queue, at->qid, out, SHM_OBJECT_MAX_BUFFERS, dst,
                        STREAM_COPY_MAX, copy_only, &seq));
    PyObject *payload;
    switch (rc) {
    case SHM_QGET_COPIED: {
        Py_ssize_t len = (Py_ssize_t)out[SHM_GET_PICKLE_LEN];
        int value = len >= 1 && dst[0] == BYTES_MARK;
        rc = value ? TAKE_BYTES : TAKE_STREAM;
        payload = PyBytes_FromStringAndSize(dst + value, len - value);
        break;
    }
    case SHM_QGET_HELD:
        rc = TAKE_HELD;
        payload = Py_NewRef(Py_None);
        break;
    case SHM_QGET_EMPTY:
        rc = TAKE_EMPTY;
        payload = PyLong_FromUnsignedLong(seq);
        break;
    case SHM_QGET_VALUE:
    case SHM_QGET_REF:
        rc = rc == SHM_QGET_REF ? TAKE_REF : TAKE_VIEW;
        payload = view_tuple(out);
        break;
    default:
        payload = Py_NewRef(Py_None);
    }
    *code = rc;
    return payload;
}

/* take(slot, queue, queue_id, copy_only): Queue.get()'s core call. (TAKE_BYTES, the bytes value)
 * or (TAKE_STREAM, the stream to decode): copied out, this process's hold dropped already;
 * (TAKE_VIEW or TAKE_REF, the view tuple): held by slot now; (TAKE_EMPTY, the not_empty word's
 * value); with copy_only, (TAKE_HELD, None) for an item that would be held, left in the queue;
 * (a negative status, None). */
static PyObject *port_take(Port *self, PyObject *const *args, Py_ssize_t n) {
    Place at;
    long code;
    if (nargs_are("take", n, 4) || place_args(args, &at)) return NULL;
    int copy_only = PyObject_IsTrue(args[3]);
    if (copy_only < 0) return NULL;
    PyObject *payload = take(self, &at, copy_only, &code);
    return payload ? pair(code, payload) : NULL;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* shm_queue_wait for at most ns nanoseconds (-1: no limit), running the Python signal handlers
 * when a signal interrupts it and waiting again for the time left: its status, or WAIT_RAISED
 * when a handler raised. */
#define WAIT_RAISED INT32_MIN
static int wait_word(Port *self, uint64_t control, int32_t which, uint32_t seq, long long ns) {
    if (ns > MAX_WAIT_NS) ns = MAX_WAIT_NS;
    int64_t deadline = ns < 0 ? -1 : now_ns() + ns;
    for (;;) {
        int rc;
        /* a signal that came before the wait or during its spin (which the sleep that follows
         * does not notice) is handled before and after it: a get() looping in C would
         * otherwise never run its handler (Ctrl-C) */
        if (PyErr_CheckSignals() < 0) return WAIT_RAISED;
        UNLOCKED(rc = core.wait(self->h, control, which, seq, ns));
        if (PyErr_CheckSignals() < 0) return WAIT_RAISED;
        if (rc != SHM_EINTR) return rc;
        if (deadline >= 0 && (ns = deadline - now_ns()) < 0) ns = 0;
    }
}

/* wait(control, which, seq, ns): shm_queue_wait, sleeping at most ns nanoseconds (-1: no limit)
 * while the queue's word `which` holds seq. A signal's interruption runs the Python handlers
 * (which may raise) and waits again for the time left. SHM_OK (woken, or the word changed),
 * SHM_ETIMEDOUT, or another status. */
static PyObject *port_wait(Port *self, PyObject *const *args, Py_ssize_t n) {
    uint64_t control, seq;
    int32_t which;
    long long ns;
    if (nargs_are("wait", n, 4) || arg_u64(args[0], &control) || arg_slot(args[1], &which) ||
        arg_u64(args[2], &seq))
        return NULL;
    if (seq > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "seq is a 32-bit word's value");
        return NULL;
    }
    if ((ns = PyLong_AsLongLong(args[3])) == -1 && PyErr_Occurred()) return NULL;
    int rc = wait_word(self, control, which, (uint32_t)seq, ns);
    return rc == WAIT_RAISED ? NULL : PyLong_FromLong(rc);
}

static PyMethodDef port_methods[] = {
    {"put_bytes", (PyCFunction)(void (*)(void))port_put_bytes, METH_FASTCALL, NULL},
    {"put_new", (PyCFunction)(void (*)(void))port_put_new, METH_FASTCALL, NULL},
    {"take", (PyCFunction)(void (*)(void))port_take, METH_FASTCALL, NULL},
    {"wait", (PyCFunction)(void (*)(void))port_wait, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PortType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmalloc._fastcall.Port",
    .tp_basicsize = sizeof(Port),
    .tp_dealloc = (destructor)port_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Port(handle, address): calls into the arena of a cffi handle (shmalloc._binding).",
    .tp_methods = port_methods,
    .tp_new = port_new,
};

/* self.name(*args, **kw): a Python half, with this call's arguments. */
static PyObject *python_half(PyObject *self, PyObject *name, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *stack[8], **call = stack;
    if (n + nkw + 1 > 8 && !(call = PyMem_Malloc((size_t)(n + nkw + 1) * sizeof(PyObject *))))
        return PyErr_NoMemory();
    call[0] = self;
    if (n + nkw) memcpy(call + 1, args, (size_t)(n + nkw) * sizeof(PyObject *)); /* args: NULL */
    PyObject *res = PyObject_VectorcallMethod(name, call, (size_t)n + 1, kwnames);
    if (call != stack) PyMem_Free(call);
    return res;
}

/* ---- Fields: what the C halves read of an attachment (the base of its Python class) ----
 *
 * shmalloc.attachment.Attachment keeps its port, slot and collector here, as C members: one
 * place, which Python reads and writes as attributes and the C halves below (allocate,
 * deallocate, a queue's put and get) read without an attribute lookup (two lookups per call
 * cost more than the core's own work). */

typedef struct {
    PyObject_HEAD PyObject *port; /* the Port of its handle, or None (NULL) once closed */
    PyObject *collector;          /* the event callback, or None (NULL) */
    int slot;                     /* this process's slot in the process table, or -1 */
} Fields;

static PyObject *fields_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Fields *self = (Fields *)PyType_GenericNew(type, args, kw);
    if (self) self->slot = -1;
    return (PyObject *)self;
}

static int fields_traverse(Fields *self, visitproc visit, void *arg) {
    Py_VISIT(self->port);
    Py_VISIT(self->collector);
    return 0;
}

static int fields_clear(Fields *self) {
    Py_CLEAR(self->port);
    Py_CLEAR(self->collector);
    return 0;
}

static void fields_dealloc(Fields *self) {
    PyObject_GC_UnTrack(self);
    fields_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef fields_members[] = {
    {"port", T_OBJECT, offsetof(Fields, port), 0, "the Port of the handle; None once closed"},
    {"collector", T_OBJECT, offsetof(Fields, collector), 0, "the event callback, or None"},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *fields_get_slot(Fields *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->slot);
}

/* A slot is -1 or an index: anything else is refused, never truncated into another slot. */
static int fields_set_slot(Fields *self, PyObject *value, void *closure) {
    (void)closure;
    long v;
    if (!value || !PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "slot must be an int");
        return -1;
    }
    if ((v = PyLong_AsLong(value)) == -1 && PyErr_Occurred()) return -1;
    if (v < -1 || v > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "slot %ld is neither -1 nor an index", v);
        return -1;
    }
    self->slot = (int)v;
    return 0;
}

static PyGetSetDef fields_getset[] = {
    {"slot", (getter)fields_get_slot, (setter)fields_set_slot,
     "this process's slot in the process table, -1 until claimed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmalloc._fastcall.Fields",
    .tp_basicsize = sizeof(Fields),
    .tp_dealloc = (destructor)fields_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An attachment's port, slot and collector (the base of shmalloc's Attachment).",
    .tp_traverse = (traverseproc)fields_traverse,
    .tp_clear = (inquiry)fields_clear,
    .tp_members = fields_members,
    .tp_getset = fields_getset,
    .tp_new = fields_new,
};

/* ---- Manager: the C half of shmalloc.MemoryManager (its base class) ----
 *
 * allocate() and deallocate() are the API's hottest pair; as Python methods their frames cost
 * more than the core call. Here they are C methods that do the common case (one exact int
 * argument, a slot claimed, no collector) with one core call, and hand everything else to the
 * Python methods _allocate, _alloc_result and _deallocate, which hold the rules. */

typedef struct {
    PyObject_HEAD PyObject *state; /* the shmalloc.attachment.Attachment (the _state member) */
} Manager;

static PyObject *str_allocate, *str_alloc_result, *str_deallocate;

/* The attachment's port (a new reference: a close in another thread meanwhile drops the
 * attachment's) and slot, if it is open and no collector wants events; NULL otherwise. */
static Port *quiet_port(Manager *self, int32_t *slot) {
    PyObject *state = self->state;
    if (!state || !PyObject_TypeCheck(state, &FieldsType)) return NULL;
    Fields *f = (Fields *)state;
    if ((f->collector && f->collector != Py_None) || !f->port || !Py_IS_TYPE(f->port, &PortType))
        return NULL;
    *slot = f->slot;
    return (Port *)Py_NewRef(f->port);
}

/* allocate(size, pid=None, *, align=None) */
static PyObject *manager_allocate(Manager *self, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    Port *port;
    int32_t slot;
    if (n == 1 && !kwnames && PyLong_CheckExact(args[0]) && (port = quiet_port(self, &slot))) {
        uint64_t size = PyLong_AsUnsignedLongLong(args[0]);
        if ((size == (uint64_t)-1 && PyErr_Occurred()) || !size || slot < 0) {
            PyErr_Clear(); /* not a positive size in range, or no slot yet: the Python method */
            Py_DECREF(port);
        } else {
            int64_t r;
            CALL(r = core.alloc(port->h, size, 0, slot));
            Py_DECREF(port);
            if (r > 0 && r <= SHM_ALLOC_ADDRESS_MASK) return PyLong_FromLongLong(r);
            PyObject *raw = PyLong_FromLongLong(r);
            if (!raw) return NULL;
            PyObject *call[] = {(PyObject *)self, raw, args[0], Py_None};
            PyObject *res = PyObject_VectorcallMethod(str_alloc_result, call,
                                                      4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(raw);
            return res;
        }
    }
    return python_half((PyObject *)self, str_allocate, args, nargsf, kwnames);
}

/* deallocate(address) */
static PyObject *manager_deallocate(Manager *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    Port *port;
    int32_t slot;
    PyObject *arg = PyVectorcall_NARGS(nargsf) == 1 && !kwnames ? args[0] : NULL;
    if (!arg || !PyLong_CheckExact(arg) || !(port = quiet_port(self, &slot)))
        return python_half((PyObject *)self, str_deallocate, args, nargsf, kwnames);
    uint64_t address = PyLong_AsUnsignedLongLong(arg);
    if (address == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or huge: InvalidAddress, from the Python half */
        Py_DECREF(port);
        return python_half((PyObject *)self, str_deallocate, args, nargsf, kwnames);
    }
    int64_t r;
    CALL(r = core.free(port->h, address));
    Py_DECREF(port);
    if (r >= 0) return PyLong_FromLongLong(r);
    PyObject *raw = PyLong_FromLongLong(r); /* _deallocate(address, r): the core's refusal */
    if (!raw) return NULL;
    PyObject *call[] = {(PyObject *)self, arg, raw};
    PyObject *res = PyObject_VectorcallMethod(str_deallocate, call,
                                              3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(raw);
    return res;
}

static PyObject *manager_get_state(Manager *self, void *closure) {
    (void)closure;
    if (self->state) return Py_NewRef(self->state);
    PyErr_SetString(PyExc_AttributeError, "_state");
    return NULL;
}

static int manager_set_state(Manager *self, PyObject *value, void *closure) {
    (void)closure;
    Py_XSETREF(self->state, Py_XNewRef(value));
    return 0;
}

static int manager_traverse(Manager *self, visitproc visit, void *arg) {
    Py_VISIT(self->state);
    return 0;
}

static int manager_clear(Manager *self) {
    Py_CLEAR(self->state);
    return 0;
}

static void manager_dealloc(Manager *self) {
    PyObject_GC_UnTrack(self);
    manager_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef manager_methods[] = {
    {"allocate", (PyCFunction)(void (*)(void))manager_allocate, METH_FASTCALL | METH_KEYWORDS,
     "allocate($self, size, pid=None, *, align=None)\n--\n\n"
     "Allocate ``size`` bytes; return the block's address (an offset, 16-byte aligned or\n"
     "``align``-aligned). The block is accounted to ``pid`` (default: this process)."},
    {"deallocate", (PyCFunction)(void (*)(void))manager_deallocate, METH_FASTCALL | METH_KEYWORDS,
     "deallocate($self, address)\n--\n\n"
     "Free the block at ``address`` (from any process); return its usable size."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef manager_getset[] = {
    {"_state", (getter)manager_get_state, (setter)manager_set_state,
     "this process's attachment (shmalloc.attachment.Attachment)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ManagerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmalloc._fastcall.Manager",
    .tp_basicsize = sizeof(Manager),
    .tp_dealloc = (destructor)manager_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C half of shmalloc.MemoryManager: its allocate() and deallocate().",
    .tp_traverse = (traverseproc)manager_traverse,
    .tp_clear = (inquiry)manager_clear,
    .tp_methods = manager_methods,
    .tp_getset = manager_getset,
    .tp_new = PyType_GenericNew,
};

/* ---- QueueBase: the C half of shmalloc's queues (the base of shmalloc.queues._Base) ----
 *
 * put(obj) and get() with their defaults (block, no timeout) make their first attempt here, as
 * allocate() does: one core call, with the item's stream made by the queues' encode() (or here,
 * for a bytes value) and a copied-out stream given to their decode(). Anything else (keywords,
 * an ObjectRef, a full or empty queue, a held item, a status) goes to the Python methods _put,
 * _put_answered, _get and _get_answered. */

typedef struct {
    PyObject_HEAD PyObject *att; /* "_att": the Attachment (a Fields) */
    unsigned long long address;  /* "_address", "_id": the queue object's */
    unsigned long long id;
    unsigned long long control; /* "_control": the address of its control struct (wait words) */
    long pid;    /* "_pid": the process that last adopted its fork parent's holds (0: none) */
    char closed; /* "_closed": close() was called in this process */
} QueueBase;

static PyObject *codec_encode, *codec_decode, *ref_type; /* bind_queues() */
static long long recheck_ns = 1000000000; /* bind_queues(): a blocked get's longest sleep */
static PyObject *str_put, *str_put_answered, *str_put_encoded, *str_get, *str_get_answered,
    *str_wait_failed;
static long me; /* getpid(), kept by the fork handler below */

static void after_fork_in_child(void) { me = (long)getpid(); }

/* The queue's port (a new reference) and place, if put and get may run here; NULL otherwise:
 * closed, no attachment, no slot yet, or a fork child before it adopted its parent's holds. */
static Port *queue_port(QueueBase *self, Place *at) {
    if (self->closed || self->pid != me || !self->att ||
        !PyObject_TypeCheck(self->att, &FieldsType))
        return NULL;
    Fields *f = (Fields *)self->att;
    if (f->slot < 0 || !f->port || !Py_IS_TYPE(f->port, &PortType)) return NULL;
    at->slot = f->slot;
    at->queue = self->address;
    at->qid = self->id;
    return (Port *)Py_NewRef(f->port);
}

/* put(obj, block=True, timeout=None) */
static PyObject *queue_put(QueueBase *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    Place at;
    Port *port;
    PyObject *obj = PyVectorcall_NARGS(nargsf) == 1 && !kwnames ? args[0] : NULL;
    if (!obj || !codec_encode || Py_IS_TYPE(obj, (PyTypeObject *)ref_type) ||
        !(port = queue_port(self, &at)))
        return python_half((PyObject *)self, str_put, args, nargsf, kwnames);
    PyObject *answer, *made = NULL;
    if (PyBytes_CheckExact(obj)) {
        answer = put_bytes(port, &at, obj);
    } else {
        /* encode() runs Python code (reducers, other threads meanwhile: a refused close gives
         * the slot back): the port and slot are read again once it is done */
        Py_DECREF(port);
        made = PyObject_CallOneArg(codec_encode, obj); /* raises for an unpicklable object */
        if (made && (!PyTuple_CheckExact(made) || PyTuple_GET_SIZE(made) != 2)) {
            PyErr_SetString(PyExc_TypeError, "encode() must answer (stream, buffers)");
            Py_CLEAR(made);
        }
        if (!made) return NULL;
        if (!(port = queue_port(self, &at))) { /* the Python half, without a second pickling */
            PyObject *call[] = {(PyObject *)self, made};
            answer = PyObject_VectorcallMethod(str_put_encoded, call,
                                               2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(made);
            return answer;
        }
        answer = put_new(port, &at, PyTuple_GET_ITEM(made, 0), PyTuple_GET_ITEM(made, 1));
        Py_DECREF(made);
    }
    Py_DECREF(port);
    if (!answer || answer == Py_None) return answer;
    PyObject *call[] = {(PyObject *)self, answer};
    PyObject *res = PyObject_VectorcallMethod(str_put_answered, call,
                                              2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(answer);
    return res;
}

/* get(block=True, timeout=None): with its defaults, taken and waited for here while the queue
 * is empty (each sleep at most RECHECK seconds, as the Python half's). */
static PyObject *queue_get(QueueBase *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    Place at;
    Port *port;
    if (PyVectorcall_NARGS(nargsf) || kwnames || !codec_decode || !(port = queue_port(self, &at)))
        return python_half((PyObject *)self, str_get, args, nargsf, kwnames);
    long code;
    PyObject *x;
    while ((x = take(port, &at, 1, &code)) && code == TAKE_EMPTY) {
        uint32_t seq = (uint32_t)PyLong_AsUnsignedLong(x);
        Py_DECREF(x);
        int rc = wait_word(port, self->control, SHM_QWAIT_NOT_EMPTY, seq, recheck_ns);
        if (rc == WAIT_RAISED) {
            x = NULL;
            break;
        }
        if (rc < 0 && rc != SHM_ETIMEDOUT) { /* the Python half raises it */
            Py_DECREF(port);
            PyObject *status = PyLong_FromLong(rc);
            PyObject *call[] = {(PyObject *)self, status};
            PyObject *res = status ? PyObject_VectorcallMethod(str_wait_failed, call,
                                                               2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                                               NULL)
                                   : NULL;
            Py_XDECREF(status);
            return res;
        }
    }
    Py_DECREF(port);
    if (!x || code == TAKE_BYTES) return x;
    PyObject *res;
    if (code == TAKE_STREAM) {
        res = PyObject_CallOneArg(codec_decode, x);
    } else {
        PyObject *got = PyLong_FromLong(code);
        PyObject *call[] = {(PyObject *)self, got, x};
        res = got ? PyObject_VectorcallMethod(str_get_answered, call,
                                              3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
                  : NULL;
        Py_XDECREF(got);
    }
    Py_DECREF(x);
    return res;
}

static int queue_traverse(QueueBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->att);
    return 0;
}

static int queue_clear(QueueBase *self) {
    Py_CLEAR(self->att);
    return 0;
}

static void queue_dealloc(QueueBase *self) {
    PyObject_GC_UnTrack(self);
    queue_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef queue_methods[] = {
    {"put", (PyCFunction)(void (*)(void))queue_put, METH_FASTCALL | METH_KEYWORDS,
     "put($self, obj, block=True, timeout=None)\n--\n\n"
     "Put ``obj``: pickled here, at once (an unpicklable object raises here), then in the\n"
     "queue when this returns. A full queue: wait up to ``timeout`` seconds (None: forever)\n"
     "if ``block``, else raise queue.Full at once."},
    {"get", (PyCFunction)(void (*)(void))queue_get, METH_FASTCALL | METH_KEYWORDS,
     "get($self, block=True, timeout=None)\n--\n\n"
     "The oldest item: its buffers zero-copy, read-only views over the arena. An empty\n"
     "queue: wait up to ``timeout`` seconds (None: forever) if ``block``, else raise\n"
     "queue.Empty at once."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef queue_members[] = {
    {"_att", T_OBJECT, offsetof(QueueBase, att), 0, "this process's attachment"},
    {"_address", T_ULONGLONG, offsetof(QueueBase, address), 0, "the queue object's address"},
    {"_id", T_ULONGLONG, offsetof(QueueBase, id), 0, "the queue object's id"},
    {"_control", T_ULONGLONG, offsetof(QueueBase, control), 0, "its control struct's address"},
    {"_pid", T_LONG, offsetof(QueueBase, pid), 0, "the process that adopted its parent's holds"},
    {"_closed", T_BOOL, offsetof(QueueBase, closed), 0, "close() was called in this process"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject QueueBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmalloc._fastcall.QueueBase",
    .tp_basicsize = sizeof(QueueBase),
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C half of shmalloc's queues: the first attempt of put() and get().",
    .tp_traverse = (traverseproc)queue_traverse,
    .tp_clear = (inquiry)queue_clear,
    .tp_methods = queue_methods,
    .tp_members = queue_members,
    .tp_new = PyType_GenericNew,
};

/* bind_queues(encode, decode, ObjectRef, recheck): what put() and get() call (shmalloc.encoding),
 * the type they leave to Python, and a blocked get's longest sleep in seconds. */
static PyObject *bind_queues(PyObject *module, PyObject *const *args, Py_ssize_t n) {
    (void)module;
    if (nargs_are("bind_queues", n, 4)) return NULL;
    double recheck = PyFloat_AsDouble(args[3]);
    if (recheck == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyCallable_Check(args[0]) || !PyCallable_Check(args[1]) || !PyType_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "bind_queues(encode, decode, ObjectRef, seconds)");
        return NULL;
    }
    if (!(recheck > 0 && recheck < 1e9)) {
        PyErr_SetString(PyExc_ValueError, "bind_queues(): seconds must be positive");
        return NULL;
    }
    Py_XSETREF(codec_encode, Py_NewRef(args[0]));
    Py_XSETREF(codec_decode, Py_NewRef(args[1]));
    Py_XSETREF(ref_type, Py_NewRef(args[2]));
    recheck_ns = (long long)(recheck * 1e9);
    Py_RETURN_NONE;
}

/* bind(alloc, free, put_new, take, wait): the core functions' addresses, from cffi's
 * ffi.addressof. */
static PyObject *bind(PyObject *module, PyObject *const *args, Py_ssize_t n) {
    uint64_t at[5];
    (void)module;
    if (nargs_are("bind", n, 5)) return NULL;
    for (int i = 0; i < 5; i++)
        if (arg_u64(args[i], &at[i])) return NULL;
    core.alloc = (__typeof__(core.alloc))(uintptr_t)at[0];
    core.free = (__typeof__(core.free))(uintptr_t)at[1];
    core.put_new = (__typeof__(core.put_new))(uintptr_t)at[2];
    core.take = (__typeof__(core.take))(uintptr_t)at[3];
    core.wait = (__typeof__(core.wait))(uintptr_t)at[4];
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, NULL},
    {"bind_queues", (PyCFunction)(void (*)(void))bind_queues, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmalloc._fastcall",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastcall(void) {
    if (pthread_key_create(&take_key, free)) return PyErr_NoMemory();
    if (PyType_Ready(&PortType) < 0 || PyType_Ready(&FieldsType) < 0 ||
        PyType_Ready(&ManagerType) < 0 || PyType_Ready(&QueueBaseType) < 0)
        return NULL;
    me = (long)getpid();
    if (pthread_atfork(NULL, NULL, after_fork_in_child)) return PyErr_NoMemory();
    if (!(str_allocate = PyUnicode_InternFromString("_allocate")) ||
        !(str_alloc_result = PyUnicode_InternFromString("_alloc_result")) ||
        !(str_deallocate = PyUnicode_InternFromString("_deallocate")) ||
        !(str_put = PyUnicode_InternFromString("_put")) ||
        !(str_put_answered = PyUnicode_InternFromString("_put_answered")) ||
        !(str_put_encoded = PyUnicode_InternFromString("_put_encoded")) ||
        !(str_wait_failed = PyUnicode_InternFromString("_wait_failed")) ||
        !(str_get = PyUnicode_InternFromString("_get")) ||
        !(str_get_answered = PyUnicode_InternFromString("_get_answered")))
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Port", (PyObject *)&PortType) ||
        PyModule_AddObjectRef(m, "Fields", (PyObject *)&FieldsType) ||
        PyModule_AddObjectRef(m, "Manager", (PyObject *)&ManagerType) ||
        PyModule_AddObjectRef(m, "QueueBase", (PyObject *)&QueueBaseType) ||
        PyModule_AddIntConstant(m, "STREAM_COPY_MAX", STREAM_COPY_MAX) ||
        PyModule_AddIntConstant(m, "BYTES_MARK", BYTES_MARK) ||
        PyModule_AddIntConstant(m, "TAKE_BYTES", TAKE_BYTES) ||
        PyModule_AddIntConstant(m, "TAKE_STREAM", TAKE_STREAM) ||
        PyModule_AddIntConstant(m, "TAKE_EMPTY", TAKE_EMPTY) ||
        PyModule_AddIntConstant(m, "TAKE_VIEW", TAKE_VIEW) ||
        PyModule_AddIntConstant(m, "TAKE_REF", TAKE_REF) ||
        PyModule_AddIntConstant(m, "TAKE_HELD", TAKE_HELD)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
