/* fastcall.c -- the module shmalloc._fastcall: the hand-off's hottest calls as CPython methods.
 *
 * The C core is compiled once, into shmalloc._native (cffi, build_ffi.py). A cffi call converts
 * each argument through cffi's generic machinery (a pointer argument alone costs about as much
 * as the allocation it asks for), releases and retakes the GIL, and leaves Python to turn the
 * out-parameters into objects. This module calls the same core functions, found through the
 * addresses that bind() is given once (cffi's ffi.addressof, shmalloc/_binding.py), with
 * METH_FASTCALL methods of four types:
 *   Port       one process's handle to one arena: a queue's put, take and wait, all arguments
 *              given (the Python halves' calls); here;
 *   Fields     the C base of an Attachment: its port, slot and collector, as C members;
 *   Manager    the C base of MemoryManager: allocate() and deallocate();
 *   QueueBase  the C base of the queues: put() and get(), their first attempt.
 * The last three are in halves.c (fastcall.h is what the two files share); Manager and
 * QueueBase do the common case and leave the rest to the Python methods of their subclasses.
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
#include "fastcall.h"

#include <marshal.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#define STACK_BUFFERS 8 /* a put of at most this many buffers keeps its arrays on the stack */
#define STACK_STREAM MARSHAL_MAX       /* a value's stream up to this size is made on the stack */
#define MAX_WAIT_NS (INT64_C(1) << 60) /* a longer wait is this one (36 years) */

struct fc_core fc_core;

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
    if (!fc_core.alloc) {
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

int fc_nargs_are(const char *name, Py_ssize_t n, Py_ssize_t want) {
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

static int place_args(PyObject *const *args, Place *at) {
    return arg_slot(args[0], &at->slot) || arg_u64(args[1], &at->queue) ||
                   arg_u64(args[2], &at->qid)
               ? -1
               : 0;
}

/* An upper bound of the bytes marshal (version 2) writes for a builtin scalar of an exact type,
 * whose round trip is itself; -1 for anything else, and for an int beyond 64 bits (pickle's). */
static Py_ssize_t scalar_bound(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    if (o == Py_None || t == &PyBool_Type) return 1;
    if (t == &PyFloat_Type) return 9;
    if (t == &PyComplex_Type) return 17;
    if (t == &PyLong_Type) {
        int overflow;
        (void)PyLong_AsLongLongAndOverflow(o, &overflow); /* an exact int: cannot fail */
        return overflow ? -1 : 15; /* at most 5 digits of 15 bits, their count and the type */
    }
    if (t == &PyUnicode_Type) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(o) < 0) { /* a legacy string that cannot be made ready: pickle's */
            PyErr_Clear();
            return -1;
        }
#endif
        Py_ssize_t n = PyUnicode_GET_LENGTH(o);
        int per = PyUnicode_IS_ASCII(o)                       ? 1
                  : PyUnicode_KIND(o) == PyUnicode_1BYTE_KIND ? 2
                  : PyUnicode_KIND(o) == PyUnicode_2BYTE_KIND ? 3
                                                              : 4; /* UTF-8 bytes a char */
        return n > MARSHAL_MAX ? -1 : 5 + n * per;
    }
    return -1;
}

/* 1 if value's stream is marshal's format (MARSHAL_MARK): a scalar, or an exact tuple, list or
 * dict of them, whose stream takes at most MARSHAL_MAX bytes. marshal costs a fraction of
 * pickle for these (no pickler to make, no memo) and reads them back as the same types and
 * values. It would turn any other buffer into bytes and refuses subclasses, so nothing else goes
 * that way. Version 2 keeps no references, so an object that a container holds twice is
 * written twice (and read back as two equal objects): the bound keeps such a stream small.
 * Neither this check nor marshal's writing runs Python code for these types. */
int fc_marshallable(PyObject *value) {
    Py_ssize_t total = scalar_bound(value);
    if (total >= 0) return total <= MARSHAL_MAX;
    if (PyTuple_CheckExact(value) || PyList_CheckExact(value)) {
        PyObject **items = PySequence_Fast_ITEMS(value);
        total = 5;
        for (Py_ssize_t i = 0; i < Py_SIZE(value) && total <= MARSHAL_MAX; i++) {
            Py_ssize_t one = scalar_bound(items[i]);
            if (one < 0) return 0;
            total += one;
        }
        return total <= MARSHAL_MAX;
    }
    if (PyDict_CheckExact(value)) {
        Py_ssize_t pos = 0, k_one, v_one;
        PyObject *k, *v;
        total = 2;
        while (total <= MARSHAL_MAX && PyDict_Next(value, &pos, &k, &v)) {
            if ((k_one = scalar_bound(k)) < 0 || (v_one = scalar_bound(v)) < 0) return 0;
            total += k_one + v_one;
        }
        return total <= MARSHAL_MAX;
    }
    return 0;
}

/* Queue.put() of a bytes value or a marshallable one, its stream (its mark and the bytes, or
 * marshal's format) made here. */
PyObject *fc_put_value(Port *self, const Place *at, PyObject *value) {
    PyObject *made = NULL;
    char mark = BYTES_MARK;
    if (!PyBytes_CheckExact(value)) {
        if (!(made = PyMarshal_WriteObjectToString(value, MARSHAL_VERSION))) return NULL;
        mark = MARSHAL_MARK;
    }
    PyObject *data = made ? made : value;
    uint64_t out[2];
    uint32_t seq = 0;
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    char small[STACK_STREAM + 1];
    char *stream = len <= STACK_STREAM ? small : PyMem_RawMalloc((size_t)len + 1);
    if (!stream) {
        Py_XDECREF(made);
        return PyErr_NoMemory();
    }
    stream[0] = mark;
    memcpy(stream + 1, PyBytes_AS_STRING(data), (size_t)len);
    Py_XDECREF(made);
    int rc;
    CALL(rc = fc_core.put_new(self->h, at->slot, at->queue, at->qid, stream, (uint64_t)len + 1, 0,
                              NULL, NULL, out, &seq));
    if (stream != small) PyMem_RawFree(stream);
    return put_answer(rc, out, 0, seq);
}

/* marshal_stream(value): value's stream (MARSHAL_MARK and marshal's format) if fc_marshallable()
 * takes it, else None; checked and written in one call, so that no other thread can change a
 * container in between (shmalloc.encoding asks it). */
static PyObject *marshal_stream(PyObject *module, PyObject *value) {
    (void)module;
    if (!fc_marshallable(value)) Py_RETURN_NONE;
    PyObject *made = PyMarshal_WriteObjectToString(value, MARSHAL_VERSION);
    if (!made) return NULL;
    PyObject *stream = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(made) + 1);
    if (stream) {
        PyBytes_AS_STRING(stream)[0] = MARSHAL_MARK;
        memcpy(PyBytes_AS_STRING(stream) + 1, PyBytes_AS_STRING(made),
               (size_t)PyBytes_GET_SIZE(made));
    }
    Py_DECREF(made);
    return stream;
}

/* put_bytes(slot, queue, queue_id, value): put_bytes() above. Answers as put_new. */
static PyObject *port_put_bytes(Port *self, PyObject *const *args, Py_ssize_t n) {
    Place at;
    if (fc_nargs_are("put_bytes", n, 4) || place_args(args, &at)) return NULL;
    if (!PyBytes_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "put_bytes() takes a bytes value");
        return NULL;
    }
    return fc_put_value(self, &at, args[3]);
}

/* put_new(slot, queue, queue_id, stream, buffers): Queue.put() of a new item in one core call,
 * the pickle stream (bytes) and its out-of-band buffers (a list of contiguous buffers) made into
 * an object and put in the queue. None when it is in; (seq, blocks) when the queue is full; a
 * negative status. */
PyObject *fc_put_new(Port *self, const Place *at, PyObject *stream, PyObject *list) {
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
    CALL(rc = fc_core.put_new(self->h, at->slot, at->queue, at->qid, PyBytes_AS_STRING(stream),
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
    if (fc_nargs_are("put_new", n, 5) || place_args(args, &at)) return NULL;
    return fc_put_new(self, &at, args[3], args[4]);
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
PyObject *fc_take(Port *self, const Place *at, int copy_only, long *code) {
    uint64_t out[SHM_GET_WORDS + 2 * SHM_OBJECT_MAX_BUFFERS];
    uint32_t seq = 0;
    char *dst = take_buffer();
    if (!dst) return NULL;
    int rc;
    CALL(rc = fc_core.take(self->h, at->slot, at->queue, at->qid, out, SHM_OBJECT_MAX_BUFFERS, dst,
                           STREAM_COPY_MAX, copy_only, &seq));
    PyObject *payload;
    switch (rc) {
    case SHM_QGET_COPIED: {
        Py_ssize_t len = (Py_ssize_t)out[SHM_GET_PICKLE_LEN];
        char mark = len >= 1 ? dst[0] : 0;
        if (mark == MARSHAL_MARK && len - 1 <= MARSHAL_MAX) {
            /* read from a copy: the objects it makes may start a collection, whose finalizers
             * may take from a queue on this thread, into dst */
            char copy[MARSHAL_MAX];
            memcpy(copy, dst + 1, (size_t)(len - 1));
            rc = TAKE_VALUE;
            payload = PyMarshal_ReadObjectFromString(copy, len - 1);
            break;
        }
        rc = mark == BYTES_MARK ? TAKE_VALUE : TAKE_STREAM; /* (any other stream: decode()'s) */
        payload = PyBytes_FromStringAndSize(dst + (rc == TAKE_VALUE), len - (rc == TAKE_VALUE));
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

/* take(slot, queue, queue_id, copy_only): Queue.get()'s core call. (TAKE_VALUE, the value, for a
 * bytes or a marshalled value's stream) or (TAKE_STREAM, the stream to decode): copied out, this
 * process's hold dropped already; (TAKE_VIEW or TAKE_REF, the view tuple): held by slot now;
 * (TAKE_EMPTY, the not_empty word's value); with copy_only, (TAKE_HELD, None) for an item that
 * would be held, left in the queue; (a negative status, None). */
static PyObject *port_take(Port *self, PyObject *const *args, Py_ssize_t n) {
    Place at;
    long code;
    if (fc_nargs_are("take", n, 4) || place_args(args, &at)) return NULL;
    int copy_only = PyObject_IsTrue(args[3]);
    if (copy_only < 0) return NULL;
    PyObject *payload = fc_take(self, &at, copy_only, &code);
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
int fc_wait_word(Port *self, uint64_t control, int32_t which, uint32_t seq, long long ns) {
    if (ns > MAX_WAIT_NS) ns = MAX_WAIT_NS;
    int64_t deadline = ns < 0 ? -1 : now_ns() + ns;
    for (;;) {
        int rc;
        /* a signal that came before the wait or during its spin (which the sleep that follows
         * does not notice) is handled before and after it: a get() looping in C would
         * otherwise never run its handler (Ctrl-C) */
        if (PyErr_CheckSignals() < 0) return WAIT_RAISED;
        UNLOCKED(rc = fc_core.wait(self->h, control, which, seq, ns));
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
    if (fc_nargs_are("wait", n, 4) || arg_u64(args[0], &control) || arg_slot(args[1], &which) ||
        arg_u64(args[2], &seq))
        return NULL;
    if (seq > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "seq is a 32-bit word's value");
        return NULL;
    }
    if ((ns = PyLong_AsLongLong(args[3])) == -1 && PyErr_Occurred()) return NULL;
    int rc = fc_wait_word(self, control, which, (uint32_t)seq, ns);
    return rc == WAIT_RAISED ? NULL : PyLong_FromLong(rc);
}

static PyMethodDef port_methods[] = {
    {"put_bytes", (PyCFunction)(void (*)(void))port_put_bytes, METH_FASTCALL, NULL},
    {"put_new", (PyCFunction)(void (*)(void))port_put_new, METH_FASTCALL, NULL},
    {"take", (PyCFunction)(void (*)(void))port_take, METH_FASTCALL, NULL},
    {"wait", (PyCFunction)(void (*)(void))port_wait, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject PortType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmalloc._fastcall.Port",
    .tp_basicsize = sizeof(Port),
    .tp_dealloc = (destructor)port_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Port(handle, address): calls into the arena of a cffi handle (shmalloc._binding).",
    .tp_methods = port_methods,
    .tp_new = port_new,
};

/* bind(alloc, free, put_new, take, wait): the core functions' addresses, from cffi's
 * ffi.addressof. */
static PyObject *bind(PyObject *module, PyObject *const *args, Py_ssize_t n) {
    uint64_t at[5];
    (void)module;
    if (fc_nargs_are("bind", n, 5)) return NULL;
    for (int i = 0; i < 5; i++)
        if (arg_u64(args[i], &at[i])) return NULL;
    fc_core.alloc = (__typeof__(fc_core.alloc))(uintptr_t)at[0];
    fc_core.free = (__typeof__(fc_core.free))(uintptr_t)at[1];
    fc_core.put_new = (__typeof__(fc_core.put_new))(uintptr_t)at[2];
    fc_core.take = (__typeof__(fc_core.take))(uintptr_t)at[3];
    fc_core.wait = (__typeof__(fc_core.wait))(uintptr_t)at[4];
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, NULL},
    {"bind_queues", (PyCFunction)(void (*)(void))fc_bind_queues, METH_FASTCALL, NULL},
    {"marshal_stream", marshal_stream, METH_O, NULL},
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
    if (PyType_Ready(&PortType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Port", (PyObject *)&PortType) || fc_halves_ready(m) ||
        PyModule_AddIntConstant(m, "STREAM_COPY_MAX", STREAM_COPY_MAX) ||
        PyModule_AddIntConstant(m, "BYTES_MARK", BYTES_MARK) ||
        PyModule_AddIntConstant(m, "MARSHAL_MARK", MARSHAL_MARK) ||
        PyModule_AddIntConstant(m, "TAKE_VALUE", TAKE_VALUE) ||
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
