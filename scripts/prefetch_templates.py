#!/usr/bin/env python3
"""Download the TemplateFlow files bids-siamese reads into ``$TEMPLATEFLOW_HOME`` (needs the network).

    TEMPLATEFLOW_HOME=/opt/templateflow python scripts/prefetch_templates.py      # the Docker image does this
    python scripts/prefetch_templates.py --dry-run                                # list the queries' files only

Each query is TemplateFlow's own (``templateflow.api.get``); afterwards every file must be found by
``bids_siamese.resources`` in the cache, or the script fails. Without a prefetched cache the app uses the
copies bundled with the package, so this step is optional everywhere (fMRIPrep users usually have the files).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: (template, TemplateFlow query) for every file bids-siamese reads; ``None`` excludes an entity.
QUERIES = [
    ("MNI152NLin2009cAsym", dict(resolution=1, desc="brain", suffix="T1w", extension=".nii.gz")),
    *[("fsLR", dict(density="32k", hemi=h, space=None, desc=None, suffix=s, extension=".surf.gii"))
      for h in ("L", "R") for s in ("midthickness", "sphere")],
    *[("fsLR", dict(density="32k", hemi=h, desc="nomedialwall", suffix="dparc", extension=".label.gii"))
      for h in ("L", "R")],
    *[("fsaverage", dict(density="10k", hemi=h, space=None, desc=None, suffix=s, extension=".surf.gii"))
      for h in ("L", "R") for s in ("white", "pial", "sphere")],
]


def expected_names() -> set[str]:
    """The file names ``bids_siamese.resources`` looks up in the cache."""
    from bids_siamese.resources import fsaverage5_file, fslr_file, template_brain

    names = {template_brain().name}
    for hemi in ("L", "R"):
        names |= {fslr_file(hemi, kind).name for kind in ("midthickness", "sphere", "nomedialwall")}
        names |= {fsaverage5_file(hemi, kind).name for kind in ("white", "pial", "sphere")}
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the files the queries select, download nothing")
    args = parser.parse_args(argv)
    import templateflow.api as tflow

    found: list[Path] = []
    for template, query in QUERIES:
        try:
            paths = tflow.ls(template, **query) if args.dry_run else tflow.get(template, **query)
        except OSError as err:  # requests' connection errors are OSErrors: the server is unreachable
            print(f"prefetch: TemplateFlow's server is not reachable for {template} ({type(err).__name__}); fix: "
                  "build with --build-arg PREFETCH_TEMPLATEFLOW=0 (the copies bundled with the package are used)",
                  file=sys.stderr)
            return 1
        paths = paths if isinstance(paths, list) else [paths]
        if len(paths) != 1:
            print(f"prefetch: {template} {query} selects {len(paths)} files, expected 1", file=sys.stderr)
            return 1
        found.append(Path(paths[0]))
        print(f"{'would fetch' if args.dry_run else 'fetched'} {paths[0]}")
    names = {p.name for p in found}
    if names != expected_names():
        print(f"prefetch: the queries select {sorted(names ^ expected_names())} unlike bids_siamese.resources",
              file=sys.stderr)
        return 1
    if not args.dry_run:
        from bids_siamese.resources import template_brain, templates_used

        used = templates_used()
        bundled = [u["Name"] for u in used if u["Source"] != "templateflow"]
        if bundled:
            print(f"prefetch: files still not found in the cache: {', '.join(bundled)}", file=sys.stderr)
            return 1
        print(f"prefetch: {len(found)} files in the TemplateFlow cache; template {template_brain().path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
