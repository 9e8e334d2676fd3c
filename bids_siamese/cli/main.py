"""Entry point: parse, check, run; turn user errors into exit codes and one-line messages."""
from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import EXIT_DATA, EXIT_NO_INPUT, EXIT_OK, NoInputError, UserError
from .parser import parse_args

LOG = logging.getLogger("bids_siamese")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)  # default INFO, -v DEBUG
    logging.basicConfig(level=level, format="%(asctime)s [%(name)s] %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    # matplotlib announces at INFO that it built its font cache (first run of each user): not the run's news
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if verbosity == 0:  # header repairs nibabel announces are reported by our header checks
        logging.getLogger("nibabel").setLevel(logging.ERROR)
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    # nipype logs every crashed node with its traceback (39-68 lines): the traceback stays in the crash file
    # and the terminal gets our one line per failed scan; -vv shows nipype's own log again
    nipype_level = "INFO" if verbosity >= 2 else "CRITICAL"
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, nipype_level if key == "workflow_level" or verbosity >= 2 else "WARNING")
    nipype_logging.update_logging(nipype_config)
    for name in ("nipype", "nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False  # nipype has its own handler: avoid double lines
    if verbosity < 2:  # nipype's CRITICAL lines (a hash file it cannot write on a full disk) come with our own line
        logging.getLogger("nipype.workflow").setLevel(logging.CRITICAL + 1)


#: In ``OUTPUT_DIR/logs``: the TemplateFlow cache state last warned about (the warning comes once per state).
TEMPLATE_STATE = ".templateflow-cache-state"


def record_templates(log_dir) -> None:
    """Write ``logs/<run_id>/templates.json``: every template file this run reads, its source and sha256."""
    from ..bids.derivatives import write_json
    from ..resources import templates_used

    used = templates_used(announce=True, state_file=log_dir.parent / TEMPLATE_STATE)
    write_json(log_dir / "templates.json", used)
    sources = sorted({entry["Source"] for entry in used})
    LOG.info("templates: %d file(s) from %s (logs/%s/templates.json)", len(used), " and ".join(sources),
             log_dir.name)


def _say(message: str, error: bool = False) -> None:
    print(f"bids-siamese: {message}", file=sys.stderr if error else sys.stdout, flush=True)


def _selection(settings):
    """Selected subjects and scans; the selection (and a typo in it) comes before validation."""
    from ..bids.layout import collect_t1w, resolve_participants, validate_dataset

    subjects = resolve_participants(settings.bids_dir, settings.participant_label)
    if not settings.skip_bids_validation:
        warnings = validate_dataset(settings.bids_dir, subjects)
        LOG.info("BIDS validation passed (%d warnings)", len(warnings))
    scans = collect_t1w(settings.bids_dir, subjects, settings.session_label, settings.bids_filters)
    LOG.info("%d T1w scan(s) selected from %d participant(s)", len(scans), len(subjects))
    return subjects, scans


def run(settings) -> int:
    """Run one analysis level with checked ``settings``; returns the exit code."""
    if settings.analysis_level == "group" and not (settings.output_dir / "dataset_description.json").is_file():
        raise NoInputError(
            f"{settings.output_dir} holds no participant-level results; fix: run the participant level first"
        )
    subjects, scans = _selection(settings)
    check_models(settings)
    if settings.analysis_level == "participant":
        from ..bids.locks import subject_locks

        # the subjects' locks first: a run that finds a subject locked (75) writes nothing but the lock files
        with subject_locks(settings.output_dir, subjects, settings.run_id):
            _start_outputs(settings)
            return run_participant_level(settings, subjects, scans)
    _start_outputs(settings)
    return run_group_level(settings, subjects, scans)


def check_models(settings) -> None:
    """Load every checkpoint given (--model, --orientation-model) before any scan is processed: a damaged or unsafe
    file is one line and exit 65 now, not after hours of preprocessing."""
    from ..models.checkpoint import load_checkpoint

    for path, task in ((settings.model, None), (settings.orientation_model, "orientation")):
        if path is not None:
            load_checkpoint(path, task=task)


def _start_outputs(settings) -> None:
    """OUTPUT_DIR's top-level files, ``logs/<run_id>/`` (settings, command, templates)."""
    from ..bids.derivatives import init_output_dir

    init_output_dir(settings.output_dir, settings.bids_dir, list(settings.derivatives.values()))
    log_dir = settings.save()
    LOG.info("run %s: settings saved in %s", settings.run_id, log_dir)
    record_templates(log_dir)


def run_participant_level(settings, subjects, scans) -> int:
    """The participant level; the caller holds the subjects' locks."""
    from ..bids.derivatives import sweep_partial_files
    from ..workflows import participant

    swept = sweep_partial_files(settings.output_dir, subjects)
    if swept:
        LOG.info("removed %d partial file(s) left by an interrupted run, e.g. %s", len(swept), swept[0])
    failures = participant.run_participant(settings, scans)
    for failure in failures:
        _say(f"FAILED {failure[0]}: {failure[1]}", error=True)
    if failures:
        code = max(getattr(f, "exit_code", EXIT_DATA) for f in failures)  # 73 (output) before 65 (data)
        others = "; other scans finished" if len(failures) < len(scans) else ""
        _say(f"error: {len(failures)} of {len(scans)} scan(s) failed ({', '.join(f[0] for f in failures)}); "
             f"crash files in {settings.log_dir / 'crash'}{others}", error=True)
        _say(_work_dir_line(settings), error=True)
        return code
    _say(f"{len(scans)} scan(s) processed; outputs in {settings.output_dir}")
    if settings.clean_workdir:
        from ..workflows.workdir import clean_work_dir

        removed = clean_work_dir(settings.work_dir, [participant._wf_name(s) for s in scans])
        _say(f"work dir {settings.work_dir} " + ("removed" if removed else "cleaned of this run's scans "
                                                 "(other runs' folders kept)"))
    else:
        _say(_work_dir_line(settings))
    return EXIT_OK


def _work_dir_line(settings) -> str:
    from ..workflows.workdir import folder_size, human_size

    size = human_size(folder_size(settings.work_dir))
    return (f"work dir {settings.work_dir} holds {size} of intermediate files (a rerun reuses them); "
            "remove it, or pass --clean-workdir, when done")


def run_group_level(settings, subjects, scans) -> int:
    from ..bids.derivatives import sweep_partial_files
    from ..workflows.group import collect_scan_status, run_group, status_summary

    if settings.task and (settings.bids_dir / "participants.tsv").is_file():
        from ..train.pairs import read_participants

        read_participants(settings.bids_dir)  # a malformed table or a participant listed twice: one line now
    sweep_partial_files(settings.output_dir)
    status = collect_scan_status(settings.output_dir, scans, settings.resolution_label)
    summary = status_summary(status)
    n_ok = sum(1 for s in status if s["status"] == "ok")
    for row in status:
        if row["status"] != "ok":
            _say(f"{row['status'].upper()} {row['name']}: {row['reason']}", error=True)
    if n_ok == 0:  # nothing to train or evaluate on: write the table and the report that say why
        settings = dataclasses.replace(settings, task=None)
    written = run_group(settings, subjects, status=status)
    for path in written:
        _say(f"wrote {path}")
    if n_ok == 0:
        _say(f"error: no selected scan has participant-level results ({summary}); fix: run the participant "
             "level (see the reasons above)", error=True)
        return EXIT_NO_INPUT
    _say(f"group level: {summary}")
    return EXIT_OK


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
    from .signals import Interrupted, handle_signals, stop_children

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
                setup_logging(settings.verbosity)
                return run(settings)
            except UserError as err:
                _say(f"error: {err}", error=True)
                return err.exit_code
            except SystemExit as done:  # --help / --version
                return int(done.code or 0)
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        stopped = stop_children()
        where = f"; rerun the same command to resume from the work dir {settings.work_dir}" if settings else ""
        workers = f" and {stopped} worker process(es)" if stopped else ""
        _say(f"error: stopped by {signal.Signals(signum).name}: run{workers} ended, finished scans are kept{where}",
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
