"""Handler discovery: built-ins, entry points and the ``--handler-path`` drop-in folder.

Three sources, searched in this order, the first provider of a subtype winning:

1. the built-in package ``tcmu_py_handlers`` (source folder ``handlers/``): every
   public module in it;
2. the entry-point group ``tcmu_py.handlers`` of installed distributions (each entry
   names a Handler class, e.g. ``zero = "zero_handler:ZeroHandler"``);
3. every ``*.py`` in the drop-in folder (tcmu-runner's ``--handler-path``, where it
   dlopens ``handler_*.so``); files whose name starts with ``_`` or ``.`` are helpers
   and are not loaded.

A module provides the classes its ``handler`` attribute names (a class or a sequence of
them) or, without one, every Handler subclass it defines that sets ``subtype``.

A broken plugin -- it fails to import, speaks another HANDLER_API, lacks ``subtype``
or ``read``/``write``, or repeats a subtype already loaded -- costs one error line that
names it and what is wrong; the others load (style.md §11: never a traceback).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType

from tcmu_py.handler import Handler, problems

__all__ = ["BUILTIN_PACKAGE", "DROPIN_PREFIX", "ENTRY_POINT_GROUP", "load_handlers"]

log = logging.getLogger("tcmu_py.registry")

BUILTIN_PACKAGE = "tcmu_py_handlers"
ENTRY_POINT_GROUP = "tcmu_py.handlers"
#: Drop-in modules are imported under this prefix so their classes have a stable
#: ``__module__`` (dataclasses and pickling look it up in ``sys.modules``).
DROPIN_PREFIX = "tcmu_py_plugin_"


class _PluginError(Exception):
    """Why one plugin is skipped; the text completes "handler plugin X skipped: ..."."""


def _import_failure(e: BaseException) -> _PluginError:
    """Describe an import-time exception in one line, with the innermost source line."""
    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    if frames and not isinstance(e, SyntaxError):  # a SyntaxError names its line itself
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return _PluginError(f"import failed: {type(e).__name__}: {e}{where}")


def _defines_subtype(cls: type) -> bool:
    return any("subtype" in vars(c) for c in cls.__mro__ if c is not Handler)


def _classes_in(module: ModuleType) -> list[object]:
    """The handler classes a module offers, per the rules in the module docstring."""
    named = getattr(module, "handler", None)
    if named is not None:
        return list(named) if isinstance(named, list | tuple) else [named]
    mine = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Handler)
        and obj is not Handler
        and obj.__module__ == module.__name__
    ]
    found: list[object] = [cls for cls in mine if _defines_subtype(cls)]
    if not found:
        if mine:
            names = ", ".join(cls.__name__ for cls in mine)
            raise _PluginError(f"{names}: no subtype (set the class attribute subtype = 'name')")
        raise _PluginError(
            "defines no handler (a Handler subclass with a subtype, or handler = Class)"
        )
    return found


def _builtin() -> Iterator[tuple[str, object]]:
    """(description, class) for the built-in handlers; import errors raise _PluginError."""
    try:
        package = importlib.import_module(BUILTIN_PACKAGE)
    except Exception as e:  # noqa: BLE001 - a plugin's failure is reported, never fatal
        yield f"built-in package {BUILTIN_PACKAGE}", _import_failure(e)
        return
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        name = f"{BUILTIN_PACKAGE}.{info.name}"
        yield from _from_module(f"built-in {name}", partial(importlib.import_module, name))


def _entry_points() -> Iterator[tuple[str, object]]:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.module == BUILTIN_PACKAGE or ep.module.startswith(BUILTIN_PACKAGE + "."):
            continue  # found by the package scan, which also sees modules not yet installed
        dist = f" of {ep.dist.name}" if ep.dist is not None else ""
        desc = f"entry point {ep.name!r} ({ep.value}){dist}"
        try:
            yield desc, ep.load()
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a plugin's failure is reported, never fatal
            yield desc, _import_failure(e)


def _dropin(handler_path: str) -> Iterator[tuple[str, object]]:
    try:
        names = sorted(os.listdir(handler_path))
    except OSError as e:
        log.error(
            "handler path %s cannot be read (%s); no drop-in handlers loaded",
            handler_path,
            e.strerror or e,
        )
        return
    for fname in names:
        if not fname.endswith(".py") or fname.startswith(("_", ".")):
            continue
        path = os.path.join(handler_path, fname)
        if os.path.isfile(path):
            yield from _from_module(f"drop-in {path}", partial(_exec_file, path))


def _exec_file(path: str) -> ModuleType:
    """Import one drop-in file as a module of its own (not a package member)."""
    name = DROPIN_PREFIX + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _from_module(desc: str, load: Callable[[], ModuleType]) -> Iterator[tuple[str, object]]:
    """Import a module through ``load()`` and yield each class it offers."""
    try:
        module = load()
        classes = _classes_in(module)
    except _PluginError as e:
        yield desc, e
        return
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a plugin's failure is reported, never fatal
        yield desc, _import_failure(e)
        return
    if len(classes) == 1:
        yield desc, classes[0]
    else:
        for cls in classes:
            yield f"{desc} ({getattr(cls, '__name__', cls)})", cls


def load_handlers(handler_path: str | None) -> dict[str, type[Handler]]:
    """Find, check and return every usable handler class, keyed by subtype.

    Broken plugins are logged (one error line each) and left out; this never raises
    because of a plugin.
    """
    found: dict[str, type[Handler]] = {}
    origin: dict[str, str] = {}
    sources = [_builtin(), _entry_points()]
    if handler_path:
        sources.append(_dropin(handler_path))
    for source in sources:
        for desc, cls in source:
            if isinstance(cls, _PluginError):
                log.error("handler plugin %s skipped: %s", desc, cls)
                continue
            wrong = problems(cls)
            if wrong:
                log.error("handler plugin %s skipped: %s", desc, "; ".join(wrong))
                continue
            assert isinstance(cls, type) and issubclass(cls, Handler)
            subtype = cls.subtype
            if subtype in found:
                if found[subtype] is not cls:
                    log.error(
                        "handler plugin %s skipped: subtype %r is already provided by %s",
                        desc,
                        subtype,
                        origin[subtype],
                    )
                continue
            found[subtype] = cls
            origin[subtype] = desc
    log.info("handlers: %s", ", ".join(f"{s} ({origin[s]})" for s in found) or "none")
    return found
