"""Messages of the ``mcdm`` commands: the standard :mod:`logging` module, with levels.

Every module logs to ``logging.getLogger(__name__)`` (under ``mcdm``); :func:`configure`, called by
``mcdm <command>``, prints them on stderr: INFO as the plain message, WARNING and above prefixed
with their level (``--log-level`` picks the threshold). A command's own result line stays on stdout.

Noise users cannot act on is filtered where it is made (:data:`NOISE`), by logger, not by a global
warnings filter: DeepSpeed's ``Attempting to get learning rate from scheduler before it has started``
(its warm-up scheduler logs it at every engine start and each time the rate is read before the first
step: 29 times in one ``make run``).
"""
from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
NOISE = {"DeepSpeed": ("Attempting to get learning rate from scheduler before it has started",)}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def silence_noise() -> None:
    """Install :data:`NOISE`'s filters (idempotent; works before the library is imported)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


def configure(level: str = "info") -> logging.Logger:
    """The ``mcdm`` logger printing on stderr at ``level`` (idempotent)."""
    silence_noise()
    logger = logging.getLogger("mcdm")
    logger.setLevel(getattr(logging, level.upper()))
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    return logger
