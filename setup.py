"""The native parts (everything else is in pyproject.toml): the relay thread (proxy/_fastrelay.c) and
the text of answers' vectors (proxy/_floattext.c)."""

from setuptools import Extension, setup

_FLAGS = ["-Wall", "-Wextra"]

setup(ext_modules=[
    Extension("proxy._fastrelay", ["proxy/_fastrelay.c"], extra_compile_args=_FLAGS),
    Extension("proxy._floattext", ["proxy/_floattext.c"], extra_compile_args=_FLAGS),
])
