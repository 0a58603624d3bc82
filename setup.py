"""Builds the compiled kernels (Cython); everything else is in pyproject.toml. A build
failure stops the install: the kernels are not optional where a compiler exists."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            # no fused multiply-add (aarch64 contracts by default): floats round as Python's
            Extension(
                f"streams.kernels.{name}",
                [f"streams/kernels/{name}.pyx"],
                extra_compile_args=["-ffp-contract=off"],
            )
            for name in (
                "_accumulate",
                "_columnar",
                "_echo",
                "_frames",
                "_inputs",
                "_vector",
                "_windows",
            )
        ],
        compiler_directives={"language_level": "3"},
    )
)
