"""``/etc/tcmu/tcmu.conf``: tcmu-runner's config file, and its live reload.

Keys (reference/tcmu.md §2.10): ``log_level`` 0 CRIT .. 5 DEBUG SCSI CMD (default 3)
and ``log_dir`` (default /var/log).  Lines are ``key = value``; ``#`` starts a comment;
unknown keys are ignored with one warning, as tcmu-runner does.  The file wins over
the command line (tcmu-runner's precedence).  Changes are picked up by polling the
file's mtime -- cheap, needs no inotify thread, and survives editors that replace the
file instead of writing it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("tcmu_py.config")

__all__ = ["DEFAULT_PATH", "ConfigWatcher", "RunnerConfig", "parse_config_text"]

DEFAULT_PATH = "/etc/tcmu/tcmu.conf"
KNOWN = {"log_level", "log_dir", "log_dir_path"}


@dataclass(frozen=True)
class RunnerConfig:
    log_level: int | None = None
    log_dir: str | None = None


def parse_config_text(text: str, source: str = DEFAULT_PATH) -> RunnerConfig:
    """Parse the file's text; a bad line is reported (naming line and token) and skipped."""
    level: int | None = None
    log_dir: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (p.strip() for p in line.partition("="))
        value = value.strip("'\"")
        if not sep:
            log.warning("%s:%d: ignoring %r (expected key = value)", source, n, line)
        elif key == "log_level":
            if value.isdigit() and 0 <= int(value) <= 5:
                level = int(value)
            else:
                log.warning("%s:%d: log_level must be 0..5, not %r", source, n, value)
        elif key in ("log_dir", "log_dir_path"):
            log_dir = value or None
        else:
            log.warning("%s:%d: unknown key %r ignored", source, n, key)
    return RunnerConfig(level, log_dir)


class ConfigWatcher:
    """Re-reads the config file when its mtime or size changes and reports the result."""

    def __init__(self, path: str, on_change: Callable[[RunnerConfig], None]) -> None:
        self.path = path
        self.on_change = on_change
        self._stamp: tuple[float, int] | None = None

    def load(self) -> RunnerConfig:
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            self._stamp = None
            return RunnerConfig()
        except OSError as e:
            log.warning("cannot read %s: %s; keeping the current settings", self.path, e)
            return RunnerConfig()
        self._stamp = (st.st_mtime, st.st_size)
        return parse_config_text(text, self.path)

    def check(self) -> bool:
        """Poll once; True (and on_change called) if the file changed."""
        try:
            st = os.stat(self.path)
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        cfg = self.load()
        log.info("%s changed: log_level=%s log_dir=%s", self.path, cfg.log_level, cfg.log_dir)
        self.on_change(cfg)
        return True
