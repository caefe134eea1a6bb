"""tcmu-py: a Python reimplementation of tcmu-runner, the userspace side of LIO ``user:`` backstores."""

__version__ = "0.1.0"

__all__ = ["__version__"]
