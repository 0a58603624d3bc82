"""Builds the compiled kernels (Cython); everything else is in pyproject.toml. A build
failure stops the install: the kernels are not optional where a compiler exists."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("streams.kernels._columnar", ["streams/kernels/_columnar.pyx"])],
        compiler_directives={"language_level": "3"},
    )
)
