"""Conformance cases: which handler, on which backing store, at what size.

A :class:`ConformanceCase` is everything the suite needs to bring one device up on the
simulated kernel.  The config string may come from a factory that gets the test's
``pytest.FixtureRequest``, so a case can ask for ``tmp_path`` or a Ceph pool fixture
and clean up through ``request.addfinalizer`` -- that is what lets the same suite run
against a file in a temporary folder today and a real RBD image later.

:func:`default_cases` turns "every handler ``load_handlers(None)`` finds" into cases:
the built-ins on every backing store worth checking, any other handler with its empty
config string if it accepts one, and otherwise a skipped entry saying how to add one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handler import Handler
from tcmu_py.registry import load_handlers
from tcmu_py.sim import SimTarget

__all__ = ["DEFAULT_SIZE", "ConfigFactory", "ConformanceCase", "HandlerFactory", "default_cases"]

#: Big enough for multi-megabyte WRITE SAME and UNMAP ranges, small enough that
#: writing the whole device takes a fraction of a second.
DEFAULT_SIZE = 8 * 1024 * 1024

#: Builds the kernel's ``dev_config`` for one test, e.g. ``"file//tmp/.../disk.img"``.
ConfigFactory = Callable[[pytest.FixtureRequest], str]
#: Finds the handler class for one test (after a fixture installed or imported it).
HandlerFactory = Callable[[pytest.FixtureRequest], type[Handler]]


@dataclass(frozen=True)
class ConformanceCase:
    """One device the conformance suite is run against.

    ``handler`` is the class, or a factory returning it per test (for a class that can
    only be imported once a fixture has run).  ``dev_config`` is the kernel's full
    string (``"ram/"``) or a factory making it per test.  ``readonly`` says which half
    of the suite applies; None takes the handler class's ``readonly`` attribute, so it
    must be given with a handler factory.  ``sim_options`` go to :class:`SimTarget`
    (``hw_max_sectors``, ``write_cache``, ``data_size``, ...).
    """

    id: str
    handler: type[Handler] | HandlerFactory
    dev_config: str | ConfigFactory
    size: int = DEFAULT_SIZE
    block_size: int = 512
    readonly: bool | None = None
    sim_options: Mapping[str, Any] = field(default_factory=dict)
    marks: tuple[pytest.MarkDecorator, ...] = ()

    def __post_init__(self) -> None:
        if self.readonly is None and not isinstance(self.handler, type):
            raise ValueError(f"case {self.id!r}: a handler factory needs readonly=True/False")

    @property
    def is_readonly(self) -> bool:
        if self.readonly is not None:
            return self.readonly
        assert isinstance(self.handler, type), "checked in __post_init__"
        return bool(getattr(self.handler, "readonly", False))

    def param(self) -> Any:
        """This case as a ``pytest.param`` (its id and marks attached)."""
        return pytest.param(self, id=self.id, marks=self.marks)

    def config(self, request: pytest.FixtureRequest) -> str:
        return self.dev_config if isinstance(self.dev_config, str) else self.dev_config(request)

    def handler_class(self, request: pytest.FixtureRequest) -> type[Handler]:
        return self.handler if isinstance(self.handler, type) else self.handler(request)

    @contextlib.contextmanager
    def serve(
        self, request: pytest.FixtureRequest, handler: type[Handler] | None = None
    ) -> Iterator[SimTarget]:
        """Serve this case (or ``handler``, a subclass of its handler) until the block ends."""
        with SimTarget(
            handler or self.handler_class(request),
            self.config(request),
            size=self.size,
            block_size=self.block_size,
            **self.sim_options,
        ) as target:
            yield target


# ---- the built-in handlers -------------------------------------------------------------


def _image_in(folder: Path, options: str = "") -> str:
    return f"file/{folder / 'disk.img'}{options}"


def _file_in_tmp(request: pytest.FixtureRequest) -> str:
    return _image_in(request.getfixturevalue("tmp_path_factory").mktemp("file-case"))


def _file_in_shm(request: pytest.FixtureRequest) -> str:
    folder = tempfile.mkdtemp(prefix="tcmu-py-conformance-", dir="/dev/shm")
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return _image_in(Path(folder))


def _file_readonly(request: pytest.FixtureRequest) -> str:
    """An image that already holds data, served with ``;readonly=1``."""
    folder = request.getfixturevalue("tmp_path_factory").mktemp("file-ro-case")
    image = folder / "disk.img"
    image.write_bytes(bytes(range(256)) * (DEFAULT_SIZE // 256))
    return _image_in(folder, ";readonly=1")


_SHM_USABLE = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)


def _ram_cases(cls: type[Handler]) -> list[ConformanceCase]:
    return [ConformanceCase("ram", cls, "ram/")]


def _file_cases(cls: type[Handler]) -> list[ConformanceCase]:
    return [
        ConformanceCase("file-tmp", cls, _file_in_tmp),
        ConformanceCase(
            "file-shm",
            cls,
            _file_in_shm,
            marks=(pytest.mark.skipif(not _SHM_USABLE, reason="/dev/shm is not writable"),),
        ),
        ConformanceCase("file-readonly", cls, _file_readonly, readonly=True),
    ]


#: Cases for handlers whose config string needs more than their name.
KNOWN: dict[str, Callable[[type[Handler]], list[ConformanceCase]]] = {
    "ram": _ram_cases,
    "file": _file_cases,
    # needs a live Ceph cluster: the service tier runs the suite against a real image
    "rbd": lambda cls: [],
}


def _guessed(subtype: str, cls: type[Handler]) -> Any:
    """A handler nobody wrote a case for: try its empty config string."""
    try:
        cls.parse_config("")
    except Exception as e:  # noqa: BLE001 - any refusal just means "needs a real case"
        reason = (
            f"handler {subtype!r} refuses the config string {subtype + '/'!r} ({e}); "
            "give it a ConformanceCase (docs/handlers.md, 'Testing your handler')"
        )
        return pytest.param(None, id=subtype, marks=pytest.mark.skip(reason=reason))
    return ConformanceCase(subtype, cls, f"{subtype}/").param()


def default_cases() -> list[Any]:
    """``pytest.param`` entries for every handler :func:`load_handlers` finds."""
    params: list[Any] = []
    for subtype, cls in sorted(load_handlers(None).items()):
        known = KNOWN.get(subtype)
        if known is not None:
            params.extend(case.param() for case in known(cls))
        else:
            params.append(_guessed(subtype, cls))
    return params
