"""Entry point: parse, check, run; turn user errors into exit codes and one-line messages."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ..errors import EXIT_DATA, EXIT_OK, NoInputError, UserError
from .parser import parse_args

LOG = logging.getLogger("bids_siamese")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)  # default INFO, -v DEBUG
    logging.basicConfig(level=level, format="%(asctime)s [%(name)s] %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_level = "INFO" if verbosity >= 2 else "WARNING"
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, nipype_level)
    nipype_logging.update_logging(nipype_config)
    for name in ("nipype", "nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False  # nipype has its own handler: avoid double lines


def record_templates(log_dir) -> None:
    """Write ``logs/<run_id>/templates.json``: every template file this run reads, its source and sha256."""
    from ..bids.derivatives import write_json
    from ..resources import templates_used

    used = templates_used(announce=True)
    write_json(log_dir / "templates.json", used)
    sources = sorted({entry["Source"] for entry in used})
    LOG.info("templates: %d file(s) from %s (logs/%s/templates.json)", len(used), " and ".join(sources),
             log_dir.name)


def run(settings) -> int:
    """Run one analysis level with checked ``settings``; returns the exit code."""
    from ..bids.derivatives import init_output_dir
    from ..bids.layout import collect_t1w, resolve_participants, validate_dataset

    if settings.analysis_level == "group" and not (settings.output_dir / "dataset_description.json").is_file():
        raise NoInputError(
            f"{settings.output_dir} holds no participant-level results; fix: run the participant level first"
        )
    if not settings.skip_bids_validation:
        warnings = validate_dataset(settings.bids_dir)
        LOG.info("BIDS validation passed (%d warnings)", len(warnings))
    subjects = resolve_participants(settings.bids_dir, settings.participant_label)
    scans = collect_t1w(settings.bids_dir, subjects, settings.session_label, settings.bids_filters)
    LOG.info("%d T1w scan(s) selected from %d participant(s)", len(scans), len(subjects))
    init_output_dir(settings.output_dir, settings.bids_dir)
    log_dir = settings.save()
    LOG.info("run %s: settings saved in %s", settings.run_id, log_dir)
    record_templates(log_dir)

    if settings.analysis_level == "participant":
        from ..workflows.participant import run_participant

        failures = run_participant(settings, scans)
        if failures:
            for name, message in failures:
                print(f"bids-siamese: FAILED {name}: {message}", file=sys.stderr)
            print(
                f"bids-siamese: error: {len(failures)} of {len(scans)} scan(s) failed "
                f"({', '.join(n for n, _ in failures)}); crash files in {log_dir}; other scans finished",
                file=sys.stderr,
            )
            return EXIT_DATA
        print(f"bids-siamese: {len(scans)} scan(s) processed; outputs in {settings.output_dir}")
        return EXIT_OK

    from ..workflows.group import run_group

    written = run_group(settings, subjects)
    for path in written:
        print(f"bids-siamese: wrote {path}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_args(argv)
        settings.command_line = ["bids-siamese", *argv]
        setup_logging(settings.verbosity)
        return run(settings)
    except UserError as err:
        print(f"bids-siamese: error: {err}", file=sys.stderr)
        return err.exit_code
    except SystemExit as done:  # --help / --version
        return int(done.code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
