# The compiled C core (cffi, API mode). Only shmalloc._binding imports it; its functions are
# typed there, one wrapper per C call.
from typing import Any

ffi: Any
lib: Any
