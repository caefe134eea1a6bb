"""Logging: tcmu-runner's six levels, a log file that logrotate can move, and stderr.

``log_level`` 0..5 maps to CRITICAL, ERROR, WARNING, INFO, DEBUG, and DEBUG-with-SCSI
(level 5 also enables the per-command logger ``tcmu_py.scsi.cmd``, which is otherwise
never called on the hot path).  The file is ``<log_dir>/tcmu-py-runner.log``; SIGHUP
reopens it (logrotate's postrotate), and a WatchedFileHandler also notices a rename.

Records about one device carry the fields ``device`` and ``handler`` (:func:`device_logger`),
printed at the end of the line as ``[device=NAME handler=SUBTYPE]`` so one device's story
can be filtered with grep.  Repeats of one message (same logger, level, text template and
device) are rate-limited: at most ``burst`` per ``interval`` seconds, then one line says
how many were dropped (:class:`RateLimit`; debug levels are never limited).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

__all__ = ["LOG_FILE", "DeviceLog", "LogSetup", "RateLimit", "device_logger", "level_for"]

LOG_FILE = "tcmu-py-runner.log"
_LEVELS = [logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, 5]
_FORMAT = "%(asctime)s %(process)d [%(levelname)s] %(name)s: %(message)s%(fields)s"


class DeviceLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry ``device`` and ``handler`` (``extra`` fields)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = dict(self.extra or {}) if extra is None else {**(self.extra or {}), **extra}
        return msg, kwargs


def device_logger(logger: logging.Logger, device: str, handler: str) -> DeviceLog:
    return DeviceLog(logger, {"device": device, "handler": handler})


class Formatter(logging.Formatter):
    """The runner's line format: device fields and suppressed-repeat counts at the end."""

    def format(self, record: logging.LogRecord) -> str:
        d = record.__dict__
        dev = d.get("device")
        fields = f" [device={dev} handler={d.get('handler', '-')}]" if dev is not None else ""
        dropped = d.get("_repeats_dropped")
        if dropped:
            fields += f" ({dropped} similar message(s) suppressed)"
        record.fields = fields
        return super().format(record)


class RateLimit(logging.Filter):
    """Let at most ``burst`` records of one kind through per ``interval`` seconds.

    A kind is (logger, level, message template, device).  The first record let through
    after a window in which some were dropped says how many (``_repeats_dropped``).
    One instance may sit on several handlers: a record is judged once."""

    def __init__(self, burst: int = 5, interval: float = 60.0, max_keys: int = 4096) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [start, count, dropped]
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        verdict = d.get("_rate_ok")
        if verdict is not None:
            return bool(verdict)
        ok = self._judge(record)
        d["_rate_ok"] = ok
        return ok

    def _judge(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        key = (record.name, record.levelno, str(record.msg), record.__dict__.get("device"))
        now = time.monotonic()
        ent = self._seen.get(key)
        if ent is None or now - ent[0] >= self.interval:
            if ent is not None and ent[2]:
                record.__dict__["_repeats_dropped"] = int(ent[2])
            if ent is None and len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            return True
        if ent[1] < self.burst:
            ent[1] += 1
            return True
        ent[2] += 1
        self.dropped += 1
        return False


def level_for(log_level: int) -> int:
    return _LEVELS[max(0, min(5, log_level))]


class LogSetup:
    """Owns the root handlers so level and directory can change at runtime."""

    def __init__(self, log_level: int = 3, log_dir: str | None = "/var/log", stderr: bool = True):
        logging.addLevelName(5, "DEBUG_SCSI_CMD")
        self.root = logging.getLogger()
        self.root.setLevel(logging.DEBUG)
        self.fmt = Formatter(_FORMAT)
        self.limit = RateLimit()
        self.stderr: logging.Handler | None = None
        if stderr:
            self.stderr = logging.StreamHandler(sys.stderr)
            self.stderr.setFormatter(self.fmt)
            self.stderr.addFilter(self.limit)
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
        self.file.addFilter(self.limit)
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
