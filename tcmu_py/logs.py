"""Logging: tcmu-runner's six levels, a log file that logrotate can move, and stderr.

``log_level`` 0..5 maps to CRITICAL, ERROR, WARNING, INFO, DEBUG, and DEBUG-with-SCSI
(level 5 also enables the per-command logger ``tcmu_py.scsi.cmd``, which is otherwise
never called on the hot path).  The file is ``<log_dir>/tcmu-py-runner.log``; SIGHUP
reopens it (logrotate's postrotate), and a WatchedFileHandler also notices a rename.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

__all__ = ["LOG_FILE", "LogSetup", "level_for"]

LOG_FILE = "tcmu-py-runner.log"
_LEVELS = [logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, 5]
_FORMAT = "%(asctime)s %(process)d [%(levelname)s] %(name)s: %(message)s"


def level_for(log_level: int) -> int:
    return _LEVELS[max(0, min(5, log_level))]


class LogSetup:
    """Owns the root handlers so level and directory can change at runtime."""

    def __init__(self, log_level: int = 3, log_dir: str | None = "/var/log", stderr: bool = True):
        logging.addLevelName(5, "DEBUG_SCSI_CMD")
        self.root = logging.getLogger()
        self.root.setLevel(logging.DEBUG)
        self.fmt = logging.Formatter(_FORMAT)
        self.stderr: logging.Handler | None = None
        if stderr:
            self.stderr = logging.StreamHandler(sys.stderr)
            self.stderr.setFormatter(self.fmt)
            self.root.addHandler(self.stderr)
        self.file: logging.handlers.WatchedFileHandler | None = None
        self.log_dir: str | None = None
        self.level = 3
        self.set_level(log_level)
        self.set_dir(log_dir)

    def set_level(self, log_level: int) -> None:
        self.level = log_level
        lvl = level_for(log_level)
        for h in (self.stderr, self.file):
            if h is not None:
                h.setLevel(lvl)
        self.root.setLevel(lvl)

    def set_dir(self, log_dir: str | None) -> None:
        if log_dir == self.log_dir and self.file is not None:
            return
        if self.file is not None:
            self.root.removeHandler(self.file)
            self.file.close()
            self.file = None
        self.log_dir = log_dir
        if not log_dir:
            return
        try:
            os.makedirs(log_dir, exist_ok=True)
            self.file = logging.handlers.WatchedFileHandler(os.path.join(log_dir, LOG_FILE))
        except OSError as e:
            logging.getLogger("tcmu_py").error(
                "cannot write the log file in %s: %s; logging to stderr only", log_dir, e
            )
            return
        self.file.setFormatter(self.fmt)
        self.file.setLevel(level_for(self.level))
        self.root.addHandler(self.file)

    def reopen(self) -> None:
        """SIGHUP: close and reopen the log file (after logrotate moved it)."""
        if self.file is not None:
            self.file.acquire()
            try:
                self.file.close()
                self.file.stream = self.file._open()
                self.file._statstream()
            finally:
                self.file.release()

    @property
    def path(self) -> str | None:
        return self.file.baseFilename if self.file is not None else None
