"""Builds the compiled kernels (Cython); everything else is in pyproject.toml. A build
failure stops the install: the kernels are not optional where a compiler exists."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(f"streams.kernels.{name}", [f"streams/kernels/{name}.pyx"])
            for name in ("_columnar", "_echo", "_frames", "_windows")
        ],
        compiler_directives={"language_level": "3"},
    )
)
