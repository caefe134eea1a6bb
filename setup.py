"""Build glue: setuptools compiles the cffi ring shim (native/) into tcmu_py._tcmu_native.

Everything declarative lives in pyproject.toml; this file exists only because cffi's
out-of-line API mode is registered through ``cffi_modules``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["tcmu_py", "tcmu_py.*"]), "tcmu_py_handlers"],
    cffi_modules=["native/build_shim.py:ffibuilder"],
)
