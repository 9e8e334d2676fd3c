"""``--use-plugin FILE``: read and check nipype plugin settings once, in the parser, before any work."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import NoInputError, UsageError

EXAMPLE = "e.g. 'plugin: SLURM' and 'plugin_args: {sbatch_args: \"--mem=8G\"}'"


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
    args = spec.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"--use-plugin file {path}: 'plugin_args' must be a mapping, not {type(args).__name__}; "
                         f"fix: {EXAMPLE}")
    return name, dict(args)
