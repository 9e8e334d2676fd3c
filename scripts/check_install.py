#!/usr/bin/env python3
"""Check that an installation (a venv, the Docker image, CI) has every file bids-siamese reads at run time.

    python scripts/check_install.py            # one line per check; exit 1 if a required check fails

Run with a Python that lacks the package (and no active virtual environment), it checks the installation that
``scripts/install.sh`` makes by default, ``./.venv``.

The Dockerfile runs it at build time and ``tests/test_container.py`` runs it in CI, so a broken image build
fails CI on a machine without Docker. Checks: the MNI152NLin2009cAsym template and the fsLR/fsaverage
surfaces (TemplateFlow cache or bundled copy), the bundled atlases, deepbet's network weights, the BIDS
validator, the command-line entry point; ``wb_command`` (Connectome Workbench) is optional and only reported.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

Check = Callable[[], str]


def check_templates() -> str:
    import nibabel as nib

    from bids_siamese.resources import template_brain

    used = template_brain()
    shape = nib.load(str(used.path)).shape
    if shape != (193, 229, 193):
        raise RuntimeError(f"{used.path} has shape {shape}, expected the 1 mm grid (193, 229, 193)")
    return f"{used.name} ({used.source}, sha256 {used.sha256[:12]})"


def check_surfaces() -> str:
    from bids_siamese.surface.gifti import cortex_mask, load_mesh

    counts = []
    for mesh, n in (("fsLR", 32492), ("fsaverage5", 10242)):
        for hemi in ("L", "R"):
            got = load_mesh(mesh, hemi, "sphere").n_vertices
            if got != n or cortex_mask(mesh, hemi).shape != (n,):
                raise RuntimeError(f"{mesh} {hemi}: {got} vertices, expected {n}")
        counts.append(f"{mesh} {n}")
    return ", ".join(counts) + " vertices per hemisphere"


def check_atlases() -> str:
    import nibabel as nib

    from bids_siamese.resources import ATLASES, atlas_paths

    for name in ATLASES:
        image, labels, _ = atlas_paths(name)
        if not labels.is_file():
            raise RuntimeError(f"atlas {name}: label file {labels} is missing")
        nib.load(str(image)).header  # noqa: B018 - reading the header proves the file is there and NIfTI
    return ", ".join(ATLASES)


def check_deepbet() -> str:
    from deepbet.utils import DATA_PATH  # where deepbet.bet.BrainExtraction looks (site-packages/data/models)

    sizes = []
    for name in ("model.pt", "bbox_model.pt"):
        path = Path(DATA_PATH) / "models" / name
        if not path.is_file() or not zipfile.is_zipfile(path):
            raise RuntimeError(f"deepbet weights {path} are missing or not a TorchScript archive")
        sizes.append(f"{name} {path.stat().st_size / 1e6:.1f} MB")
    return f"{Path(DATA_PATH) / 'models'}: " + ", ".join(sizes)


def check_validator() -> str:
    from bids_siamese.bids.layout import validator_command

    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([*validator_command(), "--version"], capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bids-validator-deno --version exited {proc.returncode}: {proc.stderr.strip()[:200]}")
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout).strip()


def check_entry_point() -> str:
    from bids_siamese import __version__
    from bids_siamese.cli.main import main

    if main(["--version"]) != 0:
        raise RuntimeError("bids-siamese --version failed")
    return f"bids-siamese {__version__}"


def check_workbench() -> str:
    exe = shutil.which("wb_command")
    if exe is None:
        raise RuntimeError("wb_command not found (optional: apt-get install connectome-workbench)")
    return exe


REQUIRED: dict[str, Check] = {
    "templates": check_templates,
    "surfaces": check_surfaces,
    "atlases": check_atlases,
    "deepbet weights": check_deepbet,
    "bids validator": check_validator,
    "entry point": check_entry_point,
}
OPTIONAL: dict[str, Check] = {"wb_command": check_workbench}


def run_checks(required: dict[str, Check] = REQUIRED, optional: dict[str, Check] = OPTIONAL) -> list[str]:
    """Run every check, print one line each; return the names of the required checks that failed."""
    failed = []
    for name, check in [*required.items(), *optional.items()]:
        try:
            detail = check()
            print(f"ok      {name}: {detail}", flush=True)
        except Exception as err:  # noqa: BLE001 - report every failure, one line each
            message = " ".join(str(err).split()) or type(err).__name__
            if name in required:
                failed.append(name)
                print(f"FAILED  {name}: {message}", flush=True)
            else:
                print(f"missing {name} (optional): {message}", flush=True)
    return failed


#: Where ``scripts/install.sh`` installs when no virtual environment is active.
DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".venv"


def installation_python() -> Path | None:
    """The Python of ``scripts/install.sh``'s default installation (``./.venv``) when this Python lacks the package
    and no virtual environment is active (as ``install.sh`` decides where to install); else ``None``."""
    if os.environ.get("VIRTUAL_ENV") or os.environ.get("BIDS_SIAMESE_CHECK_REEXEC"):
        return None
    python = DEFAULT_VENV / "bin" / "python"
    if not python.is_file() or Path(sys.prefix).resolve() == DEFAULT_VENV.resolve():
        return None
    return python


def main() -> int:
    if importlib.util.find_spec("bids_siamese") is None:
        python = installation_python()
        if python is not None:  # e.g. `python scripts/check_install.py` after `bash scripts/install.sh`
            print(f"check_install: checking the installation in {DEFAULT_VENV} ({python})", flush=True)
            os.environ["BIDS_SIAMESE_CHECK_REEXEC"] = "1"
            os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
        print(f"check_install: bids-siamese is not installed in this Python ({sys.executable}); fix: run it with the "
              "installation's Python, e.g. .venv/bin/python scripts/check_install.py after bash scripts/install.sh",
              file=sys.stderr)
        return 1
    failed = run_checks()
    if failed:
        print(f"check_install: {len(failed)} required check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("check_install: all required checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
