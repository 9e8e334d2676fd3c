"""Entry point: parse, check, run (:mod:`.levels`); turn user errors into exit codes and one-line messages."""
from __future__ import annotations

import logging
import os
import pwd
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .parser import parse_args
from ..workflows.signals import Interrupted
from .signals import handle_signals, stop_children


def say(message: str, error: bool = False) -> None:
    """One line for the user: ``bids-siamese: <message>`` on stdout, on stderr when ``error``."""
    print(f"bids-siamese: {message}", file=sys.stderr if error else sys.stdout, flush=True)


def user_cache_dirs() -> None:
    """Give matplotlib a configuration/cache directory of this user's own when its default (``~/.config``) is not
    writable, as in a container run as an arbitrary UID (Singularity, ``docker run --user``): then
    ``$TMPDIR/bids-siamese-<uid>/matplotlib`` (mode 0700), never one directory shared by every user of a node's
    ``/tmp``. An ``MPLCONFIGDIR`` the user set is kept. Workers inherit the environment."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    if os.access(config if config.exists() else config.parent, os.W_OK):
        return  # matplotlib's own default works
    path = Path(tempfile.gettempdir()) / f"bids-siamese-{os.getuid()}" / "matplotlib"
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        if path.parent.stat().st_uid != os.getuid():
            raise PermissionError(f"{path.parent} belongs to another user")
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError:  # taken by someone else: a fresh private directory for this run
        path = Path(tempfile.mkdtemp(prefix=f"bids-siamese-{os.getuid()}-matplotlib-"))
    os.environ["MPLCONFIGDIR"] = str(path)


def user_name_for_arbitrary_uid() -> None:
    """An arbitrary UID in a container (``docker run --user 54321``) has no entry in the image's ``/etc/passwd``:
    ``getpass.getuser()``, which monai calls on import, then raises ``KeyError``. It reads ``$USER`` first, so
    set ``USER=uid<N>`` when neither the environment nor the password database names this user."""
    if any(os.environ.get(name) for name in ("LOGNAME", "USER", "LNAME", "USERNAME")):
        return
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        os.environ["USER"] = f"uid{os.getuid()}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # offline by design: nipype asks the network for its latest version (etelemetry) when the first interface is
    # made, unless told not to; the workers inherit the setting
    os.environ["NIPYPE_NO_ET"] = "1"
    settings = None
    user_cache_dirs()
    user_name_for_arbitrary_uid()
    try:
        with handle_signals():
            try:
                settings = parse_args(argv)
                settings.command_line = ["bids-siamese", *argv]
                from . import levels  # deferred: nipype, torch and pybids load once the arguments parse (--help)

                levels.setup_logging(settings.verbosity)
                return levels.run(settings)
            except UserError as err:
                say(f"error: {err}", error=True)
                return err.exit_code
            except SystemExit as done:  # --help / --version
                return int(done.code or 0)
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        stopped = stop_children()
        where = f"; rerun the same command to resume from the work dir {settings.work_dir}" if settings else ""
        workers = f" and {stopped} worker process(es)" if stopped else ""
        say(f"error: stopped by {signal.Signals(signum).name}: run{workers} ended, finished scans are kept{where}",
             error=True)
        return 128 + signum


def entry(argv: Sequence[str] | None = None) -> None:
    """The program (console script, ``run.py``, ``python -m bids_siamese``): :func:`main`, then exit.

    After SIGINT/SIGTERM the workers are already stopped and the message printed, so the process ends with
    ``os._exit``: the interpreter's exit hooks of the worker pool would otherwise write to pipes of the killed
    workers and may print a traceback.
    """
    code = main(argv)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
