"""Build hook: setuptools compiles the cffi C core. All metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
