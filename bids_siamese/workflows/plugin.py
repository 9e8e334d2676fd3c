"""``--use-plugin FILE``: read and check nipype plugin settings once, in the parser, before any work.

nipype's ``SLURMGraph`` submits the whole graph (one ``sbatch`` per node, chained with ``afterok``) and returns
at once; :func:`wait_for_slurm_graph` then waits for those jobs, so that the run collects the scans' results
only when they exist. The other graph plugins (``SGEGraph``, ``PBSGraph``, ``CondorDAGMan``) would return
just as early and are refused: their polling counterparts (``SGE``, ``PBS``, ``Condor``) wait themselves.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import NoInputError, UsageError

LOG = logging.getLogger("bids_siamese.plugin")
EXAMPLE = "e.g. 'plugin: SLURM' and 'plugin_args: {sbatch_args: \"--mem=8G\"}'"
#: Graph plugins that submit and return without waiting, and the plugin to use instead.
UNWAITED = {"SGEGraph": "SGE", "PBSGraph": "PBS", "CondorDAGMan": "Condor"}
#: Seconds between two looks at the SLURM queue while the graph's jobs run.
SQUEUE_POLL_S = 2.0


def known_plugins() -> list[str]:
    """Names nipype accepts for ``Workflow.run(plugin=...)`` (``MultiProc``, ``SLURM``, ...)."""
    from nipype.pipeline import plugins

    return sorted(name[: -len("Plugin")] for name in dir(plugins) if name.endswith("Plugin") and name != "Plugin")


def load_plugin_file(path: Path) -> tuple[str, dict[str, Any]]:
    """``(plugin, plugin_args)`` from a YAML/JSON file; a :class:`UsageError` (exit 64) naming the problem.

    Raises:
        NoInputError: the file does not exist (exit 66).
        UsageError: malformed YAML/JSON, not a mapping, unknown plugin name or ``plugin_args`` not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"--use-plugin file {path} not found; fix: give an existing YAML/JSON file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UsageError(f"--use-plugin file {path} is not valid YAML/JSON ({problem}{where}); fix: correct it, "
                         f"{EXAMPLE}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--use-plugin file {path} cannot be read ({err}); fix: give a YAML/JSON text file") from err
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise UsageError(f"--use-plugin file {path} must be a mapping with 'plugin' and 'plugin_args'; fix: {EXAMPLE}")
    unknown_keys = sorted(set(map(str, spec)) - {"plugin", "plugin_args"})
    if unknown_keys:
        raise UsageError(f"--use-plugin file {path} has unknown key(s) {', '.join(unknown_keys)}; fix: use only "
                         f"'plugin' and 'plugin_args', {EXAMPLE}")
    name = str(spec.get("plugin", "MultiProc"))
    plugins = known_plugins()
    if name not in plugins:
        raise UsageError(f"--use-plugin file {path}: unknown nipype plugin '{name}'; fix: use one of "
                         f"{', '.join(plugins)}")
    if name in UNWAITED:
        raise UsageError(f"--use-plugin file {path}: nipype's {name} submits the jobs and returns without waiting "
                         f"for them; fix: use 'plugin: {UNWAITED[name]}' (or SLURMGraph on SLURM)")
    args = spec.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"--use-plugin file {path}: 'plugin_args' must be a mapping, not {type(args).__name__}; "
                         f"fix: {EXAMPLE}")
    return name, dict(args)


def graph_jobs(submit_script: Path) -> list[str]:
    """Names of the jobs in the ``submit_jobs.sh`` that nipype's ``SLURMGraph`` wrote (``j<index>_<node>``)."""
    return re.findall(r"^(j\d+_\w+)=\$\(sbatch", submit_script.read_text(), re.M)


def _queued(names: list[str], batch_dir: Path) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of this graph's jobs still in the queue: their script lies in ``batch_dir``."""
    proc = subprocess.run(["squeue", "--noheader", "--user", str(os.getuid()), "--name", ",".join(names),
                           "--format", "%i|%T|%r|%o"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"squeue exited {proc.returncode}")
    rows = [line.split("|", 3) for line in proc.stdout.splitlines() if line.count("|") == 3]
    return [(job, state, reason) for job, state, reason, command in rows
            if Path(command).parent == batch_dir]


def wait_for_slurm_graph(batch_dir: Path, since: float, poll: float = SQUEUE_POLL_S) -> int:
    """Wait until the jobs that ``SLURMGraph`` submitted from ``batch_dir`` (at or after ``since``) have left
    the queue; return how many were submitted.

    A job whose dependency failed (a node before it crashed) would stay pending for ever: it is cancelled, and
    the run reports its scan from the crash file. When the run itself is stopped (SIGTERM, Ctrl-C), the graph's
    remaining jobs are cancelled too.
    """
    script = Path(batch_dir) / "submit_jobs.sh"
    if not script.is_file() or script.stat().st_mtime < since:
        return 0
    names = graph_jobs(script)
    if not names:
        return 0
    LOG.info("SLURMGraph: waiting for the %d job(s) it submitted (scripts in %s)", len(names), batch_dir)
    failures = 0
    try:
        while True:
            try:
                queued = _queued(names, Path(batch_dir))
                failures = 0
            except OSError as err:  # squeue can time out while the controller is busy: look again
                failures += 1
                if failures > 30:  # the controller is gone: a traceback, the jobs stay as they are
                    raise
                LOG.warning("SLURMGraph: squeue failed (%s); trying again", err)
                time.sleep(poll)
                continue
            if not queued:
                return len(names)
            stuck = [job for job, state, reason in queued if state == "PENDING" and "NeverSatisfied" in reason]
            if stuck:
                LOG.warning("SLURMGraph: cancelling %d job(s) that wait for a failed one", len(stuck))
                subprocess.run(["scancel", *stuck], check=False)
            time.sleep(poll)
    except BaseException:  # stopped while waiting: leave no job of this run behind
        try:
            left = [job for job, _, _ in _queued(names, Path(batch_dir))]
        except OSError:
            left = []
        if left:
            subprocess.run(["scancel", *left], check=False)
        raise
