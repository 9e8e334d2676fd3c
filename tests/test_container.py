"""Container and install recipes: the image's build-time checks run here, the Dockerfile is linted, the image,
CI and the README install the same way (hash-checked lock), and the version has one source."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_time_checks_pass_here():
    """The checks the Dockerfile runs after installing (scripts/check_install.py), in the CI environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_install.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("templates", "surfaces", "atlases", "deepbet weights", "bids validator", "entry point"):
        assert re.search(rf"^ok +{name}: ", proc.stdout, re.M), proc.stdout


def test_build_time_checks_find_the_default_installation_from_another_python():
    """`python scripts/check_install.py` with a Python that lacks the package (here: no site-packages) checks the
    installation install.sh makes by default (./.venv), as a user on a fresh machine would run it."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.is_file():
        pytest.skip("no ./.venv here (install.sh installed into an active virtual environment)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "scripts" / "check_install.py")], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT / "scripts")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"checking the installation in {ROOT / '.venv'}" in proc.stdout
    assert re.search(r"^ok +entry point: ", proc.stdout, re.M), proc.stdout
    # an active virtual environment without the package is reported, not replaced
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "scripts" / "check_install.py")], capture_output=True,
                          text=True, env={**env, "VIRTUAL_ENV": "/nonexistent"}, timeout=60, cwd=ROOT / "scripts")
    assert proc.returncode == 1 and "is not installed in this Python" in proc.stderr


def test_build_time_checks_catch_missing_weights(monkeypatch, tmp_path, capsys):
    """The old check looked for deepbet's weights in the wrong folder: the check must follow deepbet's own path."""
    import deepbet.utils

    check = load_script("check_install")
    assert "models" in check.check_deepbet()
    monkeypatch.setattr(deepbet.utils, "DATA_PATH", str(tmp_path))
    failed = check.run_checks({"deepbet weights": check.check_deepbet}, {})
    assert failed == ["deepbet weights"]
    assert f"FAILED  deepbet weights: deepbet weights {tmp_path}/models/model.pt are missing" in capsys.readouterr().out


def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("hadolint is missing: install the test extra (bash scripts/install.sh test)")
    return exe


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_and_ci_install_the_same_way():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/install.sh" in dockerfile
    assert "&& python /tmp/src/scripts/check_install.py" in dockerfile
    assert "bash scripts/install.sh test" in ci
    # CI runs exactly the test command of the README's Quick start
    test_cmd = re.search(r"^(bash scripts/install.sh test && .*pytest.*)$", readme, re.M).group(1)
    assert test_cmd.replace(" -p no:cacheprovider", "") in ci.replace(" -p no:cacheprovider", "")


def requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def locked(path: Path) -> dict[str, list[str]]:
    """name -> hashes of every requirement in a lock file."""
    entries: dict[str, list[str]] = {}
    name = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", line)
        if m:
            name = m.group(1).lower().replace("_", "-")
            entries[name] = []
        elif name and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[name].append(h.group(1))
    return entries


def test_installs_use_the_hash_checked_lock():
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "--require-hashes --no-deps -r \"$LOCK\"" in install
    assert "requirements/lock.txt" in install and "requirements/lock-test.txt" in install
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = requirement_names(project["dependencies"]) - {"torch"}
    test = requirement_names(project["optional-dependencies"]["test"])
    for lock, wanted in (("lock.txt", runtime), ("lock-test.txt", runtime | test)):
        entries = locked(ROOT / "requirements" / lock)
        assert wanted <= set(entries), f"{lock} lacks {sorted(wanted - set(entries))}: run scripts/lock.sh"
        assert "torch" not in entries and not any(n.startswith("nvidia-") for n in entries)
        assert all(entries.values()), f"{lock}: every requirement needs a hash"
        lines = [l for l in (ROOT / "requirements" / lock).read_text().splitlines() if l and l[0].isalnum()]
        assert all("==" in l for l in lines), f"{lock}: unpinned line"


def test_packages_the_code_reaches_into_are_bounded():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("captum", "monai", "pybids", "bids-validator-deno", "deepbet", "templateflow"):
        (spec,) = [d for d in deps if requirement_names([d]) == {name}]
        assert "<" in spec, f"{name} needs an upper bound on the tested series: {spec}"
    assert "torch>=" in " ".join(deps) and "torch==" not in " ".join(deps)  # torch stays loose (install.sh pins)
    assert not {"brainspace", "nitransforms", "torchreg"} & requirement_names(deps)


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".git", "build", "*.egg-info", ".venv", "work", "out*", "demo*"):
        assert pattern in ignored


def test_version_has_one_source():
    version = (ROOT / "version").read_text().strip()
    dockerfile = (ROOT / "Dockerfile").read_text()
    singularity = (ROOT / "singularity.def").read_text()
    number = re.compile(r"\b\d+\.\d+\.\d+\b")
    assert not number.search(re.sub(r"^(ARG TORCH_VERSION|ARG PYTHON_VERSION).*$", "", dockerfile, flags=re.M))
    assert not number.search(singularity)
    assert 'BIDS_SIAMESE_CONTAINER="docker://bids/siamese"' in dockerfile
    assert re.search(r"^Bootstrap: docker$", singularity, re.M)
    assert re.search(r"^From: bids/siamese:\{\{ VERSION \}\}$", singularity, re.M)
    assert "docker-daemon://bids/siamese" in singularity  # the documented alternative
    from bids_siamese import __version__

    assert __version__ == version


def test_image_runtime_conventions():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["run.py"]' in dockerfile
    assert "install -m 0755 /tmp/src/run.py" in dockerfile
    assert os.stat(ROOT / "run.py").st_mode & stat.S_IXUSR  # the entry point is executable in the repository
    assert ROOT.joinpath("run.py").read_text().startswith("#!/usr/bin/env python")
    assert "OMP_NUM_THREADS=1" in dockerfile
    assert re.search(r"^USER 1000", dockerfile, re.M)
    assert dockerfile.count("FROM ") >= 2  # multi-stage
    assert "TEMPLATEFLOW_HOME=/opt/templateflow" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "ARG PREFETCH_TEMPLATEFLOW=0" in dockerfile  # the default works offline
    for recipe in (dockerfile, (ROOT / "singularity.def").read_text()):
        assert "MPLCONFIGDIR=/tmp/matplotlib" not in recipe  # shared by every user of a node's /tmp


def test_image_build_is_pinned_hash_checked_and_cache_friendly():
    """The base by digest, torch by hash (per variant, with the lock in one --require-hashes call), and the
    dependencies installed before the source is copied (a source edit keeps their layers)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=docker\.io/library/debian:bookworm-slim@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", dockerfile, re.M)
    deps = dockerfile.index("bash scripts/install.sh")
    assert dockerfile.index("COPY requirements/lock.txt ") < deps < dockerfile.index("COPY . /tmp/src")
    assert 'TORCH_REQUIREMENTS="requirements/torch-${TORCH_VARIANT}.txt"' in dockerfile
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert '--require-hashes --no-deps "${extra[@]}" -r "$TORCH_REQUIREMENTS" -r "$LOCK"' in install
    version = re.search(r'^TORCH_VERSION="\$\{TORCH_VERSION:-(.*)\}"$', install, re.M).group(1)
    assert f"ARG TORCH_VERSION={version}" in dockerfile
    for variant in ("cpu", "cuda"):
        entries = locked(ROOT / "requirements" / f"torch-{variant}.txt")
        assert entries["torch"] and all(entries.values()), f"torch-{variant}.txt: every wheel needs a hash"
        lock = locked(ROOT / "requirements" / "lock.txt")
        assert not set(entries) & set(lock), "torch's common dependencies come from the lock"
    torch_line = re.search(r"^torch==(\S+) ", (ROOT / "requirements" / "torch-cpu.txt").read_text(), re.M).group(1)
    assert torch_line == f"{version}+cpu"


def test_entry_point_reports_version():
    from bids_siamese import __version__

    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bids-siamese {__version__}"


def test_prefetch_queries_select_exactly_the_files_the_app_reads(tmp_path):
    """scripts/prefetch_templates.py (run in the Docker build) against TemplateFlow's offline skeleton."""
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(tmp_path / "tf"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefetch_templates.py"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("would fetch") == len(load_script("prefetch_templates").QUERIES) == 13


def test_readme_quick_start_has_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [l for l in block.splitlines()[1:] if l.strip() and not l.startswith("#")]
    assert len(commands) == 2, commands


def test_front_page_and_help_name_the_default_models(capsys):
    """README's first paragraph and --help both say which models run by default."""
    from bids_siamese.cli.main import main

    intro = (ROOT / "README.md").read_text().split("## Quick start", 1)[0]
    assert main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for text in (" ".join(intro.split()), help_text):
        assert "regional" in text and "--task twin" in text and "--task longitudinal" in text
        assert "'small'" in text or "`small`" in text


def test_matplotlib_gets_a_per_user_directory_when_home_is_not_writable(monkeypatch, tmp_path):
    """An arbitrary UID in a container (HOME not its own): MPLCONFIGDIR becomes $TMPDIR/bids-siamese-<uid>/matplotlib
    (0700), never a /tmp/matplotlib shared by every user; a directory of that name owned by someone else is not used."""
    import tempfile

    from bids_siamese.cli.main import user_cache_dirs

    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-home" / ".config"))  # neither it nor its parent exists
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    user_cache_dirs()
    mine = tmp_path / f"bids-siamese-{os.getuid()}" / "matplotlib"
    assert os.environ["MPLCONFIGDIR"] == str(mine) and mine.is_dir()
    assert stat.S_IMODE(mine.parent.stat().st_mode) == 0o700
    monkeypatch.setenv("MPLCONFIGDIR", "/kept")
    user_cache_dirs()
    assert os.environ["MPLCONFIGDIR"] == "/kept"
    if os.geteuid() == 0:  # someone else's directory of that name (chown needs root)
        shutil.rmtree(mine.parent)
        mine.parent.mkdir(mode=0o700)
        os.chown(mine.parent, 54321, 54321)
        monkeypatch.delenv("MPLCONFIGDIR")
        user_cache_dirs()
        other = Path(os.environ["MPLCONFIGDIR"])
        assert other.parent == tmp_path and other.name.startswith(f"bids-siamese-{os.getuid()}-matplotlib-")


def test_prefetch_without_templateflow_server_fails_with_one_line(monkeypatch, tmp_path, capsys):
    """PREFETCH_TEMPLATEFLOW=1 where TemplateFlow's server is unreachable: one line naming the fix, no traceback."""
    import requests
    import templateflow.api as tflow

    def unreachable(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'templateflow.s3.amazonaws.com'")

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    monkeypatch.setattr(tflow, "get", unreachable)
    assert load_script("prefetch_templates").main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not reachable" in err[0] and "fix: build with --build-arg PREFETCH_TEMPLATEFLOW=0" in err[0]


def test_an_arbitrary_uid_without_a_passwd_entry_gets_a_user_name(monkeypatch):
    """monai calls getpass.getuser() on import, which raises for a UID the image's /etc/passwd lacks (found by
    running the image as UID 54321): the entry point sets USER then, and leaves a named user alone."""
    import getpass
    import pwd

    from bids_siamese.cli.main import user_name_for_arbitrary_uid

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        # set, then removed: monkeypatch then restores the variable's original state, absent included (CI runs
        # without USER, and the USER=uid0 set below would otherwise leak into later tests)
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(KeyError):
        getpass.getuser()
    user_name_for_arbitrary_uid()
    assert getpass.getuser() == f"uid{os.getuid()}"
    monkeypatch.setenv("USER", "alice")
    user_name_for_arbitrary_uid()
    assert os.environ["USER"] == "alice"
