"""The group level at cohort scale (issue 27): N subjects' participant outputs, made cheaply, then every group step
through the CLI, each measured (wall, CPU, peak RSS of the process tree, disk written, exit code).

1. **Seed** (once, cached in ``WORK/seed-<resolution>mm``): the tiny demo (``bids-siamese-demo --size tiny``), the
   real participant level on its 7 scans, and two small checkpoints trained on those outputs for the steps that
   apply a model (``--task orientation`` and ``--task symmetry``, ``--epochs 2``).
2. **Cohort** (``WORK/cohort-<N>``): N subjects made from the seed scans without the participant level. Per
   family a seed scan and a smooth random intensity field (a few per cent, separable, low frequency); MZ
   co-twins share the field, DZ co-twins half of it; every scan adds its own Gaussian noise (0.03 of the
   inter-quartile range) inside the brain. About 10 % of the subjects are twins (half MZ, half DZ), 20 % have a
   second session (labelled ``decline`` or ``stable``, the declining ones losing a little intensity), and one
   scan in 200 gets a planted lesion (a dark sphere of radius 3 voxels in one hemisphere). The model-grid T1w is
   written as scaled int16 with gzip level 1 (the app reads any NIfTI dtype; NIfTI has no float16); every
   other file is hard-linked from its seed scan, or for the small records (completion record, orientation QC,
   sidecars) rewritten with the new names and sizes. The raw BIDS side hard-links the seed's raw T1w.
3. **Steps**, each ``python -m bids_siamese BIDS OUT group ...`` in its own process: ``qc`` (no ``--task``),
   ``twin_train`` (``--task twin``, default model, ``--epochs E``, ``--no-explain``; writes the relatives
   table), ``twin_apply`` (``--mode apply --model`` the checkpoint just trained), ``longitudinal``
   (``--epochs E --n-draws D``, default 2 and 2), ``symmetry`` (``--mode apply`` with the seed checkpoint: reference, scoring and the
   Siamese model), ``orientation_apply`` (``--mode apply`` with the seed checkpoint), ``symmetry_train``
   (``--task symmetry --mode train --epochs`` ``--symmetry-epochs``, default 1: reference, scoring, training on
   planted lesions, evaluation on the test scans). All with ``--skip-bids-validation``.

Peak RSS is the largest sum of VmRSS over the step's process tree, polled every 0.2 s (``/proc``; not the
kernel's ``ru_maxrss``, which counts the forked child's copy of this process's memory before ``exec``);
``peak_anon_gb`` the same for RssAnon (anonymous memory, without the
pages of memory-mapped files that the kernel may drop); CPU time is user + system of the step and its waited-for
children (``os.wait4``); disk written is the growth of the bytes allocated under the cohort's OUTPUT_DIR.
Nothing here asserts on time.

Usage::

    nice -n 5 python benchmarks/cohort.py --subjects 1000 --json /tmp/cohort/n1000.json --work /tmp/cohort
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_siamese.bids.derivatives import write_tsv
from bids_siamese.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("qc", "twin_train", "twin_apply", "longitudinal", "symmetry", "orientation_apply", "symmetry_train")
LESION_EVERY = 200


def cli(bids: Path, out: Path, level: str, *args: str) -> list[str]:
    """The command line of one bids-siamese run with the sources first on ``PYTHONPATH`` (:func:`child_env`).

    ``-P``: without it ``python -m`` puts the working folder first on the path, and a run started in another
    checkout would use that checkout's sources instead of ``--source``'s.
    """
    return [sys.executable, "-P", "-m", "bids_siamese", str(bids), str(out), level, *args]


def child_env(source: Path = ROOT) -> dict[str, str]:
    """The environment of the steps: ``source`` (a checkout's root) first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(source) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def tree_rss(root: int) -> tuple[int, int]:
    """Bytes resident in ``root`` and all its descendants now (``/proc``; 0 for processes gone meanwhile): all
    (VmRSS) and anonymous (RssAnon: what the kernel cannot drop, unlike the pages of mapped files)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    total, anon, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS:", "RssAnon:")))
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
    return total, anon


def disk_bytes(folder: Path) -> int:
    """Bytes allocated under ``folder`` (each inode once, so hard links count once)."""
    seen, total = set(), 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def measure(cmd: list[str], out_dir: Path, log: Path, source: Path = ROOT) -> dict:
    """Run ``cmd``; its wall and CPU seconds, peak RSS (GB) of its process tree, disk written (GB) and ok."""
    before = disk_bytes(out_dir)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(source))
        peak = peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, anon = tree_rss(proc.pid)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            time.sleep(0.2)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gb": round(peak / 1e9, 3), "peak_anon_gb": round(peak_anon / 1e9, 3), "disk_gb": round((disk_bytes(out_dir) - before) / 1e9, 4),
            "ok": proc.returncode == 0, "exit_code": proc.returncode}


def run_checked(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")


def make_seed(work: Path, resolution: float, demo: Path | None = None) -> Path:
    """The tiny demo (a copy of ``demo`` if given), its participant level and two small checkpoints (cached: a
    finished seed is reused)."""
    seed = work / f"seed-{resolution:g}mm"
    if (seed / "done").is_file():
        return seed
    shutil.rmtree(seed, ignore_errors=True)
    seed.mkdir(parents=True)
    res = ["--resolution", f"{resolution:g}", "--skip-bids-validation"]
    if demo is not None:
        shutil.copytree(demo, seed / "bids")
    else:
        generate(seed / "bids", size="tiny", seed=0)
    run_checked(cli(seed / "bids", seed / "out", "participant", *res, "-w", str(seed / "work"), "--clean-workdir"),
                seed / "participant.log")
    models = seed / "models_run"
    models.mkdir()
    for item in (seed / "out").iterdir():  # the model runs write into a copy: the seed outputs stay participant-only
        if item.name.startswith("sub-"):
            os.symlink(item.resolve(), models / item.name)
    for name in ("dataset_description.json", ".bidsignore"):
        shutil.copy(seed / "out" / name, models / name)
    for task in ("orientation", "symmetry"):
        run_checked(cli(seed / "bids", models, "group", *res, "--task", task, "--epochs", "2"), seed / f"{task}.log")
    (seed / "done").write_text("ok\n")
    return seed


def checkpoint(folder: Path, task: str) -> Path:
    found = sorted((folder / "models").glob(f"{task}_*/model.pt"))
    if not found:
        raise SystemExit(f"no {task} checkpoint under {folder / 'models'}")
    return found[0]


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A separable low-frequency field (sum of two cosines per axis), ``amplitude`` at most about."""
    field = np.zeros(shape, np.float32)
    for axis, n in enumerate(shape):
        x = np.linspace(0, np.pi, n, dtype=np.float32)
        curve = sum(rng.normal(0, amplitude / 3) * np.cos(k * x + rng.uniform(0, np.pi)) for k in (1, 2))
        field += curve.reshape([-1 if a == axis else 1 for a in range(len(shape))]).astype(np.float32)
    return field


def plan_cohort(n: int, n_seed: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per subject: family, zygosity, the seed scan of its family, sessions and label."""
    n_twin_pairs = min(n // 2, max(4, int(round(0.05 * n))))  # twin training needs 3 MZ pairs at least
    rows, fam = [], 0
    labels = [f"{i + 1:05d}" for i in range(n)]
    i = 0
    for pair in range(n_twin_pairs):
        zyg = "MZ" if pair % 2 == 0 or pair < 3 else "DZ"
        for _ in range(2):
            rows.append({"label": labels[i], "family": fam, "zygosity": zyg})
            i += 1
        fam += 1
    while i < n:
        rows.append({"label": labels[i], "family": fam, "zygosity": "none"})
        i += 1
        fam += 1
    table = pd.DataFrame(rows)
    families = table["family"].max() + 1
    table["seed_scan"] = rng.integers(0, n_seed, families)[table["family"]]
    # 20 % with two sessions (10 at least: the longitudinal splits need 3 of each label in training and validation)
    two = np.zeros(n, bool)
    two[rng.permutation(n)[:min(n, max(10, int(round(0.2 * n))))]] = True
    table["n_sessions"] = np.where(two, 2, 1)
    table["group"] = "n/a"
    table.loc[two, "group"] = np.resize(["decline", "stable"], int(two.sum()))
    table["age"] = rng.integers(9, 11, n)
    table["sex"] = rng.choice(["F", "M"], n)
    return table


def seed_scans(seed: Path) -> list[dict]:
    """The seed's finished scans: prefix (``sub-001_ses-01``), anat folder, subject and session labels."""
    scans = []  # the usable scans that the participant level did not find left-right flipped
    for status in sorted((seed / "out").glob("sub-*/ses-*/anat/*_desc-status_qc.json")):
        prefix = status.name.split("_desc-status_qc.json")[0]
        qc = json.loads((status.parent / f"{prefix}_desc-orientation_qc.json").read_text())
        if qc.get("lr_flip_verdict") != "ok" or not qc.get("usable", True):
            continue
        sub, ses = prefix.split("_")[:2]
        scans.append({"prefix": prefix, "anat": status.parent, "sub": sub, "ses": ses,
                      "raw": seed / "bids" / sub / ses / "anat" / f"{prefix}_T1w.nii.gz"})
    return scans


def write_scan(out: Path, seed: dict, sub: str, ses: str, volume: np.ndarray | None, img: nib.Nifti1Image) -> None:
    """One scan's participant-level outputs named for ``sub``/``ses``: the model-grid T1w from ``volume`` (None:
    hard-linked from the seed scan), the rest hard-linked or rewritten from the seed scan, then the completion record with the new sizes."""
    old_prefix, new_prefix = seed["prefix"], f"{sub}_{ses}"
    anat = out / sub / ses / "anat"
    figures = out / sub / "figures"
    anat.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)

    def renamed(text: str) -> str:
        return (text.replace(old_prefix, new_prefix).replace(f"{seed['sub']}/{seed['ses']}", f"{sub}/{ses}")
                .replace(f"{seed['sub']}/figures", f"{sub}/figures")
                .replace(f'"{seed["sub"]}"', f'"{sub}"').replace(f'"{seed["ses"]}"', f'"{ses}"'))

    record = json.loads((seed["anat"] / f"{old_prefix}_desc-status_qc.json").read_text())
    files = []
    for item in record["files"]:
        src = seed["anat"].parents[2] / item["path"]
        rel = Path(renamed(item["path"]))
        dst = out / rel
        if volume is not None and dst.name.endswith("desc-preproc_T1w.nii.gz"):
            new = nib.Nifti1Image(volume, img.affine, img.header)
            new.set_data_dtype(np.int16)
            new.to_filename(dst)
        elif src.suffix in (".json", ".tsv", ".txt"):
            dst.write_text(renamed(src.read_text()))
        else:
            os.link(src, dst)
        files.append({"path": str(rel), "size": dst.stat().st_size})
    record.update(scan=renamed(record["scan"]), files=files)
    (anat / f"{new_prefix}_desc-status_qc.json").write_text(json.dumps(record, indent=2))


def session_row(ses: str, j: int, row) -> dict:
    return {"session_id": ses, "acq_time": f"20{17 + 2 * j}-0{1 + int(row.label) % 9}-1{j}T10:00:00",
            "age": row.age + 2 * j}


def link_raw(bids: Path, seed: dict, sub: str, ses: str, j: int, row) -> None:
    """The raw T1w and sidecar (hard links to the seed's) and the session's ``scans.tsv``."""
    raw = bids / sub / ses / "anat"
    raw.mkdir(parents=True)
    os.link(seed["raw"], raw / f"{sub}_{ses}_T1w.nii.gz")
    os.link(seed["raw"].with_name(seed["raw"].name.replace(".nii.gz", ".json")), raw / f"{sub}_{ses}_T1w.json")
    write_tsv(bids / sub / ses / f"{sub}_{ses}_scans.tsv", pd.DataFrame(
        {"filename": [f"anat/{sub}_{ses}_T1w.nii.gz"], "acq_time": [session_row(ses, j, row)["acq_time"]]}))


def build_cohort(seed: Path, dest: Path, n: int, rng_seed: int = 0, perturb: bool = True) -> dict:
    """N subjects' raw BIDS stand-ins and participant-level outputs in ``dest/bids`` and ``dest/out``; with
    ``perturb=False`` every model-grid T1w is a hard link to its seed scan (for the steps that read only records)."""
    rng = np.random.default_rng(rng_seed)
    scans = seed_scans(seed)
    shutil.rmtree(dest, ignore_errors=True)
    bids, out = dest / "bids", dest / "out"
    bids.mkdir(parents=True)
    out.mkdir(parents=True)
    for name in ("dataset_description.json", "README", "CHANGES", "participants.json", "sessions.json"):
        shutil.copy(seed / "bids" / name, bids / name)
    for name in ("dataset_description.json", ".bidsignore", "README.md"):
        shutil.copy(seed / "out" / name, out / name)
    imgs = [nib.load(s["anat"] / f"{s['prefix']}_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz") for s in scans]
    bases = [np.asarray(img.dataobj, dtype=np.float32) for img in imgs]
    brains = [b != 0 for b in bases]
    plan = plan_cohort(n, len(scans), rng)
    fields: dict[int, np.ndarray] = {}
    lesions = []
    participants = []
    k = 0
    for row in plan.itertuples():
        sub = f"sub-{row.label}"
        s = int(row.seed_scan)
        if perturb and row.family not in fields:  # co-twins are consecutive rows: only the current family's field is kept
            fields = {row.family: smooth_field(rng, bases[s].shape, 0.05)}
        if perturb:
            shared, own = fields[row.family], smooth_field(rng, bases[s].shape, 0.05)
            field = {"MZ": shared + 0.1 * own, "DZ": 0.5 * (shared + own)}.get(row.zygosity, own)
        participants.append({"participant_id": sub, "family_id": f"fam{row.family:05d}", "zygosity": row.zygosity,
                             "age": row.age, "sex": row.sex, "group": row.group})
        sessions = []
        for j in range(row.n_sessions):
            ses = f"ses-{j + 1:02d}"
            if not perturb:
                k += 1
                write_scan(out, scans[s], sub, ses, None, imgs[s])
                link_raw(bids, scans[s], sub, ses, j, row)
                sessions.append(session_row(ses, j, row))
                continue
            vol = bases[s] * (1.0 + field)
            if j and row.group == "decline":
                vol *= 0.97
            vol += rng.standard_normal(vol.shape, dtype=np.float32) * 0.03
            vol[~brains[s]] = 0
            if k % LESION_EVERY == LESION_EVERY // 2:
                centre = np.argwhere(brains[s])[rng.integers(0, int(brains[s].sum()))]
                grid = np.ogrid[tuple(slice(0, d) for d in vol.shape)]
                sphere = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 9
                vol[sphere & brains[s]] *= 0.3
                lesions.append({"scan": f"{sub}_{ses}", "centre_voxel": centre.tolist()})
            k += 1
            write_scan(out, scans[s], sub, ses, vol, imgs[s])
            link_raw(bids, scans[s], sub, ses, j, row)
            sessions.append(session_row(ses, j, row))
        write_tsv(bids / sub / f"{sub}_sessions.tsv", pd.DataFrame(sessions))
    write_tsv(bids / "participants.tsv", pd.DataFrame(participants))
    return {"subjects": n, "scans": k, "twin_pairs": int((plan["zygosity"] != "none").sum() // 2),
            "two_sessions": int((plan["n_sessions"] == 2).sum()), "lesions": lesions}


def step_commands(seed: Path, dest: Path, resolution: float, epochs: int, draws: int,
                  symmetry_epochs: int = 1) -> dict[str, list[str]]:
    bids, out = dest / "bids", dest / "out"
    common = ["--resolution", f"{resolution:g}", "--skip-bids-validation"]
    train = ["--epochs", str(epochs)]
    twin_model = out / "models" / "twins_regional" / "model.pt"
    return {
        "qc": cli(bids, out, "group", *common),
        "twin_train": cli(bids, out, "group", *common, "--task", "twin", *train, "--no-explain"),
        "twin_apply": cli(bids, out, "group", *common, "--task", "twin", "--mode", "apply", "--model",
                          str(twin_model), "--no-explain"),
        "longitudinal": cli(bids, out, "group", *common, "--task", "longitudinal", *train, "--n-draws", str(draws)),
        "symmetry": cli(bids, out, "group", *common, "--task", "symmetry", "--mode", "apply", "--model",
                        str(checkpoint(seed / "models_run", "symmetry"))),
        "orientation_apply": cli(bids, out, "group", *common, "--task", "orientation", "--mode", "apply",
                                 "--model", str(checkpoint(seed / "models_run", "orientation"))),
        "symmetry_train": cli(bids, out, "group", *common, "--task", "symmetry", "--mode", "train", "--epochs",
                              str(symmetry_epochs)),
    }


def fit_growth(reports: list[dict]) -> dict[str, dict]:
    """Per step, from the runs that succeeded, for wall and CPU seconds: ``a + b N`` (least squares; reported as
    ``a`` and ``1000 b``, seconds per 1000 subjects) and the exponent k of ``~ N^k`` (least squares on logs)."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for report in reports:
        for name, step in report["steps"].items():
            if step["ok"]:
                points.setdefault(name, []).append((int(report["subjects"]), float(step["wall_s"]),
                                                    float(step["cpu_s"])))
    fits = {}
    for name, pts in points.items():
        n, wall, cpu = np.array(sorted(pts), dtype=float).T
        if len(set(n)) < 2:
            continue
        fits[name] = {"points": [[int(x), float(w), float(c)] for x, w, c in zip(n, wall, cpu)]}
        for key, y in (("wall", wall), ("cpu", cpu)):
            b, a = np.polyfit(n, y, 1)
            fits[name][key] = {"intercept_s": round(float(a), 1), "s_per_1000": round(1000 * float(b), 1),
                               "exponent": round(float(np.polyfit(np.log(n), np.log(y), 1)[0]), 2)}
    return fits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, help="cohort size N")
    p.add_argument("--fit", nargs="+", type=Path, metavar="JSON",
                   help="instead of a run: fit the growth of each step's wall time over these results")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--work", type=Path, default=Path("/tmp/cohort"), help="seed and cohort folders")
    p.add_argument("--resolution", type=float, default=2.0, help="model grid (mm)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of twin_train and longitudinal")
    p.add_argument("--n-draws", type=int, default=2, help="--n-draws of the longitudinal step (its splits)")
    p.add_argument("--symmetry-epochs", type=int, default=1, help="--epochs of the symmetry_train step")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--source", type=Path, default=ROOT,
                   help="the checkout whose bids_siamese runs the group steps (default: this one), e.g. an older "
                        "commit's `git worktree` to measure before and after a change")
    p.add_argument("--demo", type=Path, help="an existing tiny demo (bids-siamese-demo DIR --size tiny) to seed from")
    p.add_argument("--volumes", choices=("perturbed", "linked"), default="perturbed",
                   help="linked: every model-grid T1w a hard link to its seed scan (no per-subject variation; fast, "
                        "for the qc step, which reads only records)")
    p.add_argument("--reuse", action="store_true", help="reuse a cohort of this N kept by an earlier --keep run")
    p.add_argument("--keep", action="store_true", help="keep the cohort's files (default: removed at the end)")
    args = p.parse_args(argv)
    if args.fit:
        for name, fit in fit_growth([json.loads(path.read_text()) for path in args.fit]).items():
            w, c = fit["wall"], fit["cpu"]
            print(f"{name:18s} wall {w['intercept_s']} s + {w['s_per_1000']} s/1000 subjects (~N^{w['exponent']}); "
                  f"CPU {c['intercept_s']} s + {c['s_per_1000']} s/1000 (~N^{c['exponent']}); "
                  f"N, wall, CPU: {fit['points']}")
        return 0
    if args.subjects is None:
        p.error("--subjects N is required (or --fit)")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seed = make_seed(args.work, args.resolution, args.demo)
    seed_s = time.perf_counter() - t0
    dest = args.work / f"cohort-{args.subjects}"
    made = dest / "cohort.json"
    if args.reuse and made.is_file():  # a kept cohort of the same N: its generation figures as measured then
        cohort, generation = (json.loads(made.read_text())[k] for k in ("cohort", "generation"))
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        cohort = build_cohort(seed, dest, args.subjects, perturb=args.volumes == "perturbed")
        generation = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                      "disk_gb": round(disk_bytes(dest) / 1e9, 3)}
        made.write_text(json.dumps({"cohort": cohort, "generation": generation}))
    print(f"generate: {cohort['subjects']} subjects, {cohort['scans']} scans, {cohort['twin_pairs']} twin pairs, "
          f"{cohort['two_sessions']} with two sessions, {len(cohort['lesions'])} lesions: "
          f"{generation['wall_s']:.1f} s wall, {generation['disk_gb']:.2f} GB", flush=True)
    commands = step_commands(seed, dest, args.resolution, args.epochs, args.n_draws, args.symmetry_epochs)
    results = {}
    for name in args.steps:
        load = os.getloadavg()
        res = measure(commands[name], dest / "out", args.work / f"cohort-{args.subjects}-{name}.log", args.source)
        res["load_avg_1m"] = [round(load[0], 2), round(os.getloadavg()[0], 2)]  # at the start and the end
        results[name] = res
        print(f"{name:18s} wall {res['wall_s']:9.1f} s  cpu {res['cpu_s']:9.1f} s  peak RSS {res['peak_rss_gb']:6.2f} GB "
              f"(anon {res['peak_anon_gb']:5.2f})  disk {res['disk_gb']:7.4f} GB  ok {res['ok']}  (load {load[0]:.1f})", flush=True)
    report = {"subjects": args.subjects, "cohort": {k: v for k, v in cohort.items() if k != "lesions"},
              "lesions": cohort["lesions"], "generation": generation, "seed_s": round(seed_s, 1),
              "options": {"resolution": args.resolution, "epochs": args.epochs, "n_draws": args.n_draws,
                          "symmetry_epochs": args.symmetry_epochs, "explain": False, "volumes": args.volumes,
                          "source": str(args.source),
                          "bids_validation": False},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "steps": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(dest, ignore_errors=True)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
