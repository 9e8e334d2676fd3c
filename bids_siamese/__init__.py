"""bids-siamese: a BIDS App bringing 3D Siamese networks to brain MRI."""
from importlib import metadata as _metadata
from pathlib import Path as _Path


def _read_version() -> str:
    source_tree = _Path(__file__).resolve().parent.parent / "version"
    if source_tree.is_file():
        return source_tree.read_text().strip()
    try:
        return _metadata.version("bids-siamese")
    except _metadata.PackageNotFoundError:  # pragma: no cover - not installed, no source tree
        return "0+unknown"


__version__ = _read_version()
__all__ = ["__version__"]
