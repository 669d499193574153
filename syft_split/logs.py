"""Keep PySyft's and uvicorn's chatter out of the user's output.

Launching a datasite prints start-up lines, logs a CRITICAL "Hash of the signing key" line,
warns about the default password, shows upload progress bars, and the uvicorn server process
logs INFO lines to the terminal (or into whichever notebook cell is running) for as long as it
lives. syft-split wraps those calls in :func:`quiet`: the output goes to a log file per
datasite (:func:`log_path`) instead. Set the environment variable ``SYFT_SPLIT_VERBOSE=1``
(the demo's ``--verbose``) to see everything as PySyft prints it.

The root logger's level is restored afterwards either way (launching a PySyft server sets it
to CRITICAL).

The log folder is the user's own (``<tmp>/syft-split-logs-<uid>``, mode 0700; refused if it is
a symlink or another user's) and log files are opened without following a symlink (mode
0600): another local user can neither read the output nor redirect it into a file of yours.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

__all__ = ["VERBOSE_ENV", "verbose", "log_dir", "log_path", "quiet"]

#: set to 1 to see PySyft's and uvicorn's output
VERBOSE_ENV = "SYFT_SPLIT_VERBOSE"


def verbose() -> bool:
    """True when ``SYFT_SPLIT_VERBOSE`` asks to see PySyft's output."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def log_dir() -> Path:
    """This user's log folder, ``<tmp>/syft-split-logs-<uid>``: made with mode 0700 if new;
    ConfigError if it is a symlink, not a folder, or someone else's (a folder left open to
    others is closed to 0700)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir(), f"syft-split-logs-{uid if uid is not None else 'user'}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"log folder {folder} is not a folder (a symlink?): remove it")
    if uid is not None and st.st_uid != uid:
        raise ConfigError(f"log folder {folder} belongs to user {st.st_uid}, not you ({uid}): "
                          "remove it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder


def log_path(name: str) -> Path:
    """Where the output of datasite ``name`` goes (``<log_dir()>/<name>.log``)."""
    return log_dir() / f"{name}.log"


def _open_log(log: Path) -> io.TextIOBase:
    """``log`` opened to append (created 0600), never through a symlink (ConfigError)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(log, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open log file {log} (a symlink?): {exc}") from exc
    return open(fd, "a", encoding="utf-8")  # type: ignore[return-value]


@contextlib.contextmanager
def _python_output(sink: io.TextIOBase) -> Iterator[None]:
    """Python-level stdout/stderr to ``sink``; in IPython also rich displays (PySyft shows
    SyftInfo/SyftWarning and notebook progress bars with ``display``)."""
    shell = None
    try:
        from IPython.core.interactiveshell import InteractiveShell

        if InteractiveShell.initialized():
            shell = InteractiveShell.instance()
    except ImportError:
        pass
    if shell is None:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # type: ignore[type-var]
            yield
        return
    from IPython.utils.capture import capture_output

    with capture_output(stdout=True, stderr=True, display=True) as captured:
        try:
            yield
        finally:
            sink.write(captured.stdout + captured.stderr)
            for out in captured.outputs:
                sink.write(str(out.data.get("text/plain", "")) + "\n")


@contextlib.contextmanager
def quiet(log: Path | None = None, *, fds: bool = False) -> Iterator[None]:
    """Inside: PySyft's prints, displays and ``syft`` log records go to ``log`` (or nowhere).

    ``fds=True`` also points file descriptors 1 and 2 at ``log`` while inside, so that a
    process started meanwhile (the uvicorn server of an HTTP datasite) writes there for good.
    Nothing changes when :func:`verbose`; the root logger's level is restored either way.
    """
    root = logging.getLogger()
    level = root.level
    if verbose():
        try:
            yield
        finally:
            root.setLevel(level)
        return
    syft_logger = logging.getLogger("syft")
    syft_level = syft_logger.level
    sink = _open_log(log) if log else open(os.devnull, "w")
    saved: list[tuple[int, int]] = []
    try:
        syft_logger.setLevel(logging.CRITICAL + 1)
        if fds:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        with _python_output(sink):
            yield
    finally:
        sink.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        syft_logger.setLevel(syft_level)
        root.setLevel(level)
        sink.close()
