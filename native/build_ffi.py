"""The only cffi build script: compiles the C core into ``shmalloc._native`` (API mode).

setuptools runs it through ``cffi_modules`` in setup.py; nobody runs it by hand. setup.py also
builds ``shmalloc._fastcall`` (native/fastcall.c and halves.c, the hot calls as CPython methods)
from ``FASTCALL``, with the same flags. The cdef is
the text of the two parser-clean headers, so the layout and the API are declared exactly once.
``SHMALLOC_DEBUG`` (0..3, see shm_internal.h) and ``SHMALLOC_SANITIZE=1`` in the environment select
debug builds. Every build treats a warning as an error.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = [
    "alloc.c",
    "arena.c",
    "block.c",
    "cache.c",
    "check.c",
    "copy.c",
    "error.c",
    "fault.c",
    "freelist.c",
    "gc.c",
    "handoff.c",
    "heap.c",
    "journal.c",
    "lease.c",
    "life.c",
    "lock.c",
    "names.c",
    "npalloc.c",
    "objects.c",
    "own.c",
    "process.c",
    "queue.c",
    "ring.c",
    "sizeclass.c",
    "wait.c",
]

# The one function that needs Python's C API, so it lives in the module, not in the core (which
# stress/bench_c.py links into a plain C program): the destructor of a numpy handler's capsule
# (native/npalloc.c, shmalloc/npalloc.py). It runs with the GIL held, when the last array the
# handler made is gone.
CAPSULE_FREE = """
void shm_np_capsule_free(void *capsule) {
    PyObject *keep = PyCapsule_GetContext((PyObject *)capsule);
    void *np = PyCapsule_GetPointer((PyObject *)capsule, shm_np_capsule_name());
    if (np)
        shm_np_free(np);
    else
        PyErr_Clear();
    Py_XDECREF(keep);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(
    (HERE / "shm_layout.h").read_text()
    + (HERE / "shm_api.h").read_text()
    + "void shm_np_capsule_free(void *capsule);"
)

_debug = int(os.environ.get("SHMALLOC_DEBUG", "0"))
_args = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", f"-DSHMALLOC_DEBUG={_debug}"]
_link: list[str] = []
if _debug:
    _args += ["-O1", "-g"]
else:
    _args += ["-O2", "-DNDEBUG"]
if os.environ.get("SHMALLOC_SANITIZE") == "1":
    _args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    _link += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "shmalloc._native",
    '#include "shm_internal.h"\n' + CAPSULE_FREE,
    sources=[str((HERE / s).relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=_args,
    extra_link_args=_link,
)

FASTCALL = {
    "name": "shmalloc._fastcall",
    "sources": [str((HERE / s).relative_to(HERE.parent)) for s in ("fastcall.c", "halves.c")],
    "include_dirs": [str(HERE.relative_to(HERE.parent))],
    "extra_compile_args": _args,
    "extra_link_args": _link,
}

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
