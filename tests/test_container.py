"""Container and install recipes: lint the Dockerfile, keep its install step identical to CI's."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: install the test extra (pip install '.[test]')")
    proc = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_and_ci_install_the_same_way():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/install.sh" in dockerfile
    assert "bash scripts/install.sh test" in ci
    # CI runs exactly the test command of the README's Quick start
    test_cmd = re.search(r"^(bash scripts/install.sh test && .*pytest.*)$", readme, re.M).group(1)
    assert test_cmd.replace(" -p no:cacheprovider", "") in ci.replace(" -p no:cacheprovider", "")


def test_dockerfile_runtime_conventions():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["run.py"]' in dockerfile
    assert "OMP_NUM_THREADS=1" in dockerfile
    assert re.search(r"^USER 1000", dockerfile, re.M)
    assert "BIDS_SIAMESE_CONTAINER=" in dockerfile
    assert dockerfile.count("FROM ") >= 2  # multi-stage
    version = (ROOT / "version").read_text().strip()
    assert f"ARG VERSION={version}" in dockerfile
    assert f"bids/siamese:{version}" in (ROOT / "singularity.def").read_text()


def test_readme_quick_start_has_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [l for l in block.splitlines()[1:] if l.strip() and not l.startswith("#")]
    assert len(commands) == 2, commands
