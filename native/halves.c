/* halves.c -- part of the module shmalloc._fastcall (not the core): the C halves of three
 * Python classes, each a base class whose subclass holds the rules.
 *
 *   Fields     shmalloc.attachment.Attachment's: its port, slot and collector as C members;
 *   Manager    shmalloc.MemoryManager's: allocate() and deallocate();
 *   QueueBase  shmalloc.queues._Base's: put() and get().
 *
 * Manager and QueueBase make the common call themselves (one core call through the Port, with
 * the GIL as fastcall.c keeps it) and hand every other case, and every failure, to a Python
 * method of their subclass with the arguments as given. */
#include "fastcall.h"

#include <pthread.h>
#include <string.h>
#include <structmember.h>
#include <unistd.h>

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

/* The Port of the attachment `att` (a new reference: a close in another thread meanwhile drops
 * the attachment's) and its slot; NULL unless `att` is an attachment (a Fields) with a Port and,
 * if `quiet`, no collector that wants events. */
static Port *attached_port(PyObject *att, int quiet, int32_t *slot) {
    if (!att || !PyObject_TypeCheck(att, &FieldsType)) return NULL;
    Fields *f = (Fields *)att;
    if (!f->port || !Py_IS_TYPE(f->port, &PortType) ||
        (quiet && f->collector && f->collector != Py_None))
        return NULL;
    *slot = f->slot;
    return (Port *)Py_NewRef(f->port);
}

/* Manager and QueueBase each hold one object, first after the header (the attachment): one
 * traverse, clear and dealloc serve both (their structs are checked against this one below). */
typedef struct {
    PyObject_HEAD PyObject *held;
} Holder;

static int holder_traverse(Holder *self, visitproc visit, void *arg) {
    Py_VISIT(self->held);
    return 0;
}

static int holder_clear(Holder *self) {
    Py_CLEAR(self->held);
    return 0;
}

static void holder_dealloc(Holder *self) {
    PyObject_GC_UnTrack(self);
    holder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- Manager: the C half of shmalloc.MemoryManager (its base class) ----
 *
 * allocate() and deallocate() are the API's hottest pair; as Python methods their frames cost
 * more than the core call. Here they are C methods that do the common case (one exact int
 * argument, a slot claimed, no collector) with one core call, and hand everything else to the
 * Python methods _allocate, _alloc_result and _deallocate, which hold the rules. */

typedef struct {
    PyObject_HEAD PyObject *state; /* the shmalloc.attachment.Attachment (the _state member) */
} Manager;
_Static_assert(offsetof(Manager, state) == offsetof(Holder, held), "Manager is a Holder");

static PyObject *str_allocate, *str_alloc_result, *str_deallocate;

/* allocate(size, pid=None, *, align=None) */
static PyObject *manager_allocate(Manager *self, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    Port *port;
    int32_t slot;
    if (n == 1 && !kwnames && PyLong_CheckExact(args[0]) &&
        (port = attached_port(self->state, 1, &slot))) {
        uint64_t size = PyLong_AsUnsignedLongLong(args[0]);
        if ((size == (uint64_t)-1 && PyErr_Occurred()) || !size || slot < 0) {
            PyErr_Clear(); /* not a positive size in range, or no slot yet: the Python method */
            Py_DECREF(port);
        } else {
            int64_t r;
            CALL(r = fc_core.alloc(port->h, size, 0, slot));
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
    if (!arg || !PyLong_CheckExact(arg) || !(port = attached_port(self->state, 1, &slot)))
        return python_half((PyObject *)self, str_deallocate, args, nargsf, kwnames);
    uint64_t address = PyLong_AsUnsignedLongLong(arg);
    if (address == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or huge: InvalidAddress, from the Python half */
        Py_DECREF(port);
        return python_half((PyObject *)self, str_deallocate, args, nargsf, kwnames);
    }
    int64_t r;
    CALL(r = fc_core.free(port->h, address));
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

static PyMemberDef manager_members[] = {
    {"_state", T_OBJECT_EX, offsetof(Manager, state), 0,
     "this process's attachment (shmalloc.attachment.Attachment)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ManagerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmalloc._fastcall.Manager",
    .tp_basicsize = sizeof(Manager),
    .tp_dealloc = (destructor)holder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C half of shmalloc.MemoryManager: its allocate() and deallocate().",
    .tp_traverse = (traverseproc)holder_traverse,
    .tp_clear = (inquiry)holder_clear,
    .tp_methods = manager_methods,
    .tp_members = manager_members,
    .tp_new = PyType_GenericNew,
};

/* ---- QueueBase: the C half of shmalloc's queues (the base of shmalloc.queues._Base) ----
 *
 * put(obj) and get() with their defaults (block, no timeout) make their first attempt here, as
 * allocate() does: one core call, with the item's stream made by the queues' encode() (or here,
 * for a bytes value and a marshallable one) and a copied-out stream given to their decode()
 * (or read here, for those two); get() waits here while
 * the queue is empty. Anything else (keywords, an ObjectRef, a full queue, a held item, a
 * status) goes to the Python methods _put, _put_encoded, _put_answered, _get, _get_answered and
 * _wait_failed. */

typedef struct {
    PyObject_HEAD PyObject *att; /* "_att": the Attachment (a Fields) */
    unsigned long long address;  /* "_address", "_id": the queue object's */
    unsigned long long id;
    unsigned long long control; /* "_control": the address of its control struct (wait words) */
    long pid;    /* "_pid": the process that last adopted its fork parent's holds (0: none) */
    char closed; /* "_closed": close() was called in this process */
} QueueBase;
_Static_assert(offsetof(QueueBase, att) == offsetof(Holder, held), "QueueBase is a Holder");

static PyObject *codec_encode, *codec_decode, *ref_type; /* bind_queues() */
static long long recheck_ns = 1000000000; /* bind_queues(): a blocked get's longest sleep */
static PyObject *str_put, *str_put_answered, *str_put_encoded, *str_get, *str_get_answered,
    *str_wait_failed;
static long me; /* getpid(), kept by the fork handler below */

static void after_fork_in_child(void) { me = (long)getpid(); }

/* The queue's port (a new reference) and place, if put and get may run here; NULL otherwise:
 * closed, no attachment, no slot yet, or a fork child before it adopted its parent's holds. */
static Port *queue_port(QueueBase *self, Place *at) {
    if (self->closed || self->pid != me) return NULL;
    Port *port = attached_port(self->att, 0, &at->slot);
    if (port && at->slot < 0) Py_CLEAR(port);
    at->queue = self->address;
    at->qid = self->id;
    return port;
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
    if (PyBytes_CheckExact(obj) || fc_marshallable(obj)) { /* no Python code runs for these */
        answer = fc_put_value(port, &at, obj);
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
        answer = fc_put_new(port, &at, PyTuple_GET_ITEM(made, 0), PyTuple_GET_ITEM(made, 1));
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
    while ((x = fc_take(port, &at, 1, &code)) && code == TAKE_EMPTY) {
        uint32_t seq = (uint32_t)PyLong_AsUnsignedLong(x);
        Py_DECREF(x);
        int rc = fc_wait_word(port, self->control, SHM_QWAIT_NOT_EMPTY, seq, recheck_ns);
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
    if (!x || code == TAKE_VALUE) return x;
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
    .tp_dealloc = (destructor)holder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C half of shmalloc's queues: the first attempt of put() and get().",
    .tp_traverse = (traverseproc)holder_traverse,
    .tp_clear = (inquiry)holder_clear,
    .tp_methods = queue_methods,
    .tp_members = queue_members,
    .tp_new = PyType_GenericNew,
};

/* bind_queues(encode, decode, ObjectRef, recheck): what put() and get() call (shmalloc.encoding),
 * the type they leave to Python, and a blocked get's longest sleep in seconds. */
PyObject *fc_bind_queues(PyObject *module, PyObject *const *args, Py_ssize_t n) {
    (void)module;
    if (fc_nargs_are("bind_queues", n, 4)) return NULL;
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

int fc_halves_ready(PyObject *module) {
    if (PyType_Ready(&FieldsType) < 0 || PyType_Ready(&ManagerType) < 0 ||
        PyType_Ready(&QueueBaseType) < 0)
        return -1;
    me = (long)getpid();
    if (pthread_atfork(NULL, NULL, after_fork_in_child)) {
        PyErr_NoMemory();
        return -1;
    }
    if (!(str_allocate = PyUnicode_InternFromString("_allocate")) ||
        !(str_alloc_result = PyUnicode_InternFromString("_alloc_result")) ||
        !(str_deallocate = PyUnicode_InternFromString("_deallocate")) ||
        !(str_put = PyUnicode_InternFromString("_put")) ||
        !(str_put_answered = PyUnicode_InternFromString("_put_answered")) ||
        !(str_put_encoded = PyUnicode_InternFromString("_put_encoded")) ||
        !(str_wait_failed = PyUnicode_InternFromString("_wait_failed")) ||
        !(str_get = PyUnicode_InternFromString("_get")) ||
        !(str_get_answered = PyUnicode_InternFromString("_get_answered")))
        return -1;
    return PyModule_AddObjectRef(module, "Fields", (PyObject *)&FieldsType) ||
                   PyModule_AddObjectRef(module, "Manager", (PyObject *)&ManagerType) ||
                   PyModule_AddObjectRef(module, "QueueBase", (PyObject *)&QueueBaseType)
               ? -1
               : 0;
}
