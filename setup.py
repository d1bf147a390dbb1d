"""Build hook: setuptools compiles the cffi C core and the module of its hot calls (both from
native/build_ffi.py). All metadata lives in pyproject.toml."""

import sys
from pathlib import Path

from setuptools import Extension, setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "native"))
from build_ffi import FASTCALL  # noqa: E402

setup(cffi_modules=["native/build_ffi.py:ffibuilder"], ext_modules=[Extension(**FASTCALL)])
