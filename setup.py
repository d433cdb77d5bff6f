"""Only here so that `pip install .` builds the cffi core into the wheel."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
