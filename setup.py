"""The one native part: the relay thread of proxy/_fastrelay.c (everything else is in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy._fastrelay", ["proxy/_fastrelay.c"], extra_compile_args=["-Wall", "-Wextra"])])
