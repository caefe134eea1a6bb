"""Handler discovery: built-ins, a drop-in folder with good and broken plugins, entry points."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.handler import Handler
from tcmu_py.registry import DROPIN_PREFIX, load_handlers

DOCS_EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "zero_handler.py"

GOOD = """
    from tcmu_py.handler import Handler

    class Good(Handler):
        subtype = "good"

        def read(self, offset, length, bufs):
            pass

        def write(self, offset, length, bufs, fua):
            pass
"""

PLUGINS = {
    "good.py": GOOD,
    # one module, two handlers, named explicitly
    "pair.py": """
        from tcmu_py.handler import Handler

        class Base(Handler):
            readonly = True
            def read(self, offset, length, bufs):
                pass

        class Left(Base):
            subtype = "left"

        class Right(Base):
            subtype = "right"

        handler = (Left, Right)
    """,
    "broken_import.py": """
        import module_that_does_not_exist
    """,
    "wrong_api.py": GOOD.replace('"good"', '"future"').replace(
        'subtype = "future"', 'subtype = "future"\n        api_version = 99'
    ),
    "good_again.py": GOOD.replace("class Good", "class Again"),
    "nosubtype.py": GOOD.replace('subtype = "good"', "pass"),
    "empty.py": "X = 1\n",
    "exits.py": "raise SystemExit(3)\n",
    "_helper.py": "raise RuntimeError('helpers are not plugins')\n",
    "notes.txt": "not python\n",
}


@pytest.fixture
def clean_modules() -> Iterator[None]:
    """Forget the modules a test imported, so every test loads its plugins afresh."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(DROPIN_PREFIX) or name.startswith("zeroplug"):
            del sys.modules[name]


@pytest.fixture
def dropin(tmp_path: Path, clean_modules: None) -> Path:
    folder = tmp_path / "handlers.d"
    folder.mkdir()
    for name, text in PLUGINS.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _install_entry_point(site: Path, module: str, source: str, target: str) -> None:
    """Make a distribution visible to importlib.metadata: a .dist-info next to its module."""
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[tcmu_py.handlers]\n{target}\n")
    (site / f"{module}.py").write_text(source)


def test_builtin_handlers_load_without_a_handler_path(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tcmu_py.registry"):
        handlers = load_handlers(None)
    assert handlers["file"].__module__ == "tcmu_py_handlers.file"
    assert all(issubclass(cls, Handler) and cls.subtype == s for s, cls in handlers.items())
    assert not _errors(caplog)
    assert any("built-in tcmu_py_handlers.file" in r.getMessage() for r in caplog.records)


def test_dropin_folder_loads_good_plugins_and_skips_each_broken_one_with_one_line(
    dropin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tcmu_py.registry"):
        handlers = load_handlers(str(dropin))
    assert {"good", "left", "right", "file"} <= set(handlers)
    assert "future" not in handlers
    assert handlers["good"].__name__ == "Good"  # files load in name order; the first provider wins
    errors = _errors(caplog)
    expected = {
        "broken_import.py": "ModuleNotFoundError: No module named 'module_that_does_not_exist'",
        "wrong_api.py": "api_version is 99, this runner speaks HANDLER_API 1",
        "good_again.py": "subtype 'good' is already provided by drop-in",
        "nosubtype.py": "Good: no subtype",
        "empty.py": "defines no handler",
        "exits.py": "SystemExit: 3",
    }
    assert len(errors) == len(expected), errors
    for fname, words in expected.items():
        [line] = [e for e in errors if f"{dropin / fname} skipped" in e]
        assert words in line, line
    assert not any("_helper" in e or "notes" in e for e in errors)


def test_a_dropin_cannot_replace_a_builtin(dropin: Path, caplog: pytest.LogCaptureFixture) -> None:
    (dropin / "myfile.py").write_text(textwrap.dedent(GOOD).replace('"good"', '"file"'))
    with caplog.at_level(logging.ERROR, logger="tcmu_py.registry"):
        handlers = load_handlers(str(dropin))
    assert handlers["file"].__module__ == "tcmu_py_handlers.file"
    assert any(
        "myfile.py skipped: subtype 'file' is already provided by built-in" in e
        for e in _errors(caplog)
    )


def test_a_missing_handler_path_is_one_error_and_builtins_still_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tcmu_py.registry"):
        handlers = load_handlers(str(tmp_path / "absent"))
    assert "file" in handlers
    [line] = _errors(caplog)
    assert str(tmp_path / "absent") in line and "cannot be read" in line


def test_an_entry_point_plugin_is_found_once_installed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    clean_modules: None,
) -> None:
    site = tmp_path / "site"
    _install_entry_point(site, "zeroplug", DOCS_EXAMPLE.read_text(), "zero = zeroplug:ZeroHandler")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    with caplog.at_level(logging.INFO, logger="tcmu_py.registry"):
        handlers = load_handlers(None)
    assert handlers["zero"].__module__ == "zeroplug"
    assert not _errors(caplog)
    assert any(
        "entry point 'zero' (zeroplug:ZeroHandler) of zeroplug" in r.getMessage()
        for r in caplog.records
    )


def test_a_broken_entry_point_is_reported_and_skipped(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    clean_modules: None,
) -> None:
    site = tmp_path / "site"
    _install_entry_point(site, "zeroplug_bad", "1 / 0\n", "bad = zeroplug_bad:Handler")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    with caplog.at_level(logging.ERROR, logger="tcmu_py.registry"):
        handlers = load_handlers(None)
    assert "file" in handlers
    [line] = _errors(caplog)
    assert "entry point 'bad' (zeroplug_bad:Handler)" in line
    assert "ZeroDivisionError" in line and "zeroplug_bad.py:1" in line


def test_the_documented_example_works_as_a_dropin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, clean_modules: None
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(DOCS_EXAMPLE, folder)
    with caplog.at_level(logging.ERROR, logger="tcmu_py.registry"):
        zero = load_handlers(str(folder))["zero"]
    assert not _errors(caplog)
    h = zero()
    buf = bytearray(b"x" * 1024)
    h.read(0, 1024, [memoryview(buf)[:512], memoryview(buf)[512:]])
    assert buf == bytes(1024)


def test_the_handler_guide_shows_the_example_file_verbatim() -> None:
    guide = (DOCS_EXAMPLE.parents[1] / "handlers.md").read_text()
    assert f"```python\n{DOCS_EXAMPLE.read_text()}```" in guide
