"""The package's shape, kept by a test (issue 25): layers, deferred imports, private names, re-export detours.

Every check reads the source with :mod:`ast` (nothing is imported) and fails with one ``file:line: what``
line per offence. ``python tests/test_layers.py`` prints the number of offences per file and per check
(``-v``: every offence).

Layers, high to low (a module imports only its own package or a lower layer; ``if TYPE_CHECKING:``
imports are exempt, they never run)::

    cli = synthetic > workflows > interfaces > explain > symmetry > train > models > reports > surface
    > qc > atlas > config > bids > preproc > resources > errors > the package root (``__version__``)
"""
from __future__ import annotations

import ast
import functools
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PACKAGE_NAME = "bids_siamese"
PACKAGE = Path(__file__).resolve().parents[1] / PACKAGE_NAME

#: Layers from high to low; names on one line share a layer.
LAYERS = (
    ("cli", "synthetic", "__main__"),
    ("workflows",),
    ("interfaces",),
    ("explain",),
    ("symmetry",),
    ("train",),
    ("models",),
    ("reports",),
    ("surface",),
    ("qc",),
    ("atlas",),
    ("config",),
    ("bids",),
    ("preproc",),
    ("resources",),
    ("errors",),
    ("", "data"),
)
RANK = {name: len(LAYERS) - i for i, names in enumerate(LAYERS) for name in names}
#: Imports inside functions: at most this share of all imports, each with this end-of-line comment.
MAX_DEFERRED_SHARE = 0.03
DEFERRED_MARK = "# deferred:"


@dataclass(frozen=True)
class Import:
    """One import statement (or one name of a ``from`` import) of a module of the package."""

    path: Path  # the file, relative to the repository root
    line: int
    module: str  # the absolute module imported (for ``from pkg import submodule``: the submodule)
    name: str | None  # the name taken from ``module`` (``from module import name``), None for ``import module``
    in_function: bool
    type_checking: bool
    text: str  # the statement's source lines

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def internal(self) -> bool:
        return self.module == PACKAGE_NAME or self.module.startswith(PACKAGE_NAME + ".")


def module_name(path: Path) -> str:
    """``bids_siamese/train/data.py`` -> ``bids_siamese.train.data`` (a package's ``__init__`` -> the package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(module: str) -> Path | None:
    """The file of an internal module, or None where there is none."""
    return _module_path(PACKAGE, module)


@functools.lru_cache(maxsize=None)
def _module_path(package: Path, module: str) -> Path | None:
    base = package.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def layer(module: str) -> str:
    """The layer name of an internal module: its first component below the package (``""`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool = False, type_checking: bool = False):
    """Yield (node, in_function, type_checking) for every node below ``node``."""
    for child in ast.iter_child_nodes(node):
        yield child, in_function, type_checking
        child_function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, child_function, True
                yield from _walk(stmt, child_function, True)
            for stmt in child.orelse:
                yield stmt, child_function, type_checking
                yield from _walk(stmt, child_function, type_checking)
            continue
        yield from _walk(child, child_function, type_checking)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> tuple[ast.Module, list[str]]:
    source = path.read_text()
    return ast.parse(source, filename=str(path)), source.splitlines()


def imports_of(path: Path) -> list[Import]:
    """Every import of one file: one record per ``import`` statement and per name of a ``from`` import."""
    return list(_imports_of(path))


@functools.lru_cache(maxsize=None)
def _imports_of(path: Path) -> tuple[Import, ...]:
    tree, lines = _parse(path)
    rel = path.relative_to(PACKAGE.parent)
    found = []
    for node, in_function, type_checking in _walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        text = "\n".join(lines[node.lineno - 1: node.end_lineno])
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(rel, node.lineno, alias.name, None, in_function, type_checking, text))
            continue
        base = _absolute(path, node)
        if base == "__future__":
            continue
        for alias in node.names:
            module, name = base, alias.name
            if base.split(".")[0] == PACKAGE_NAME and module_path(f"{base}.{name}") is not None:
                module, name = f"{base}.{name}", None  # ``from pkg import submodule``
            found.append(Import(rel, node.lineno, module, name, in_function, type_checking, text))
    return tuple(found)


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def statements(records: list[Import]) -> list[Import]:
    """One record per import statement (the first name of a ``from`` import with several names)."""
    seen, out = set(), []
    for record in records:
        if (record.path, record.line) not in seen:
            seen.add((record.path, record.line))
            out.append(record)
    return out


def _defined_names(path: Path) -> tuple[set[str], set[str]]:
    """(names a module defines at its top, names it only imports there)."""
    tree, _ = _parse(path)
    defined, imported = set(), set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                defined.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        else:  # if / try / with blocks at the top
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
    return defined, imported - defined


# ---------------------------------------------------------------------------------------------------- checks
def upward_imports() -> list[str]:
    """A module imports only its own package or a lower layer (``if TYPE_CHECKING:`` imports exempt)."""
    out = []
    for path in package_files():
        source = layer(module_name(path)) if path.parent != PACKAGE else path.stem
        if path == PACKAGE / "__init__.py":
            source = ""
        for record in imports_of(path):
            if not record.internal or record.type_checking:
                continue
            target = layer(record.module)
            if target != source and RANK[target] > RANK[source]:
                out.append(f"{record.where}: {source or 'root'} imports the higher layer {target} "
                           f"({record.module})")
    return list(dict.fromkeys(out))  # one line per statement and module


def undeclared_deferred_imports() -> list[str]:
    """An import inside a function says why on its line: ``# deferred: <reason>``."""
    out = []
    for path in package_files():
        for record in statements(imports_of(path)):
            if record.in_function and DEFERRED_MARK not in record.text:
                out.append(f"{record.where}: import inside a function without '{DEFERRED_MARK} <reason>' "
                           f"({record.text.strip().splitlines()[0]})")
    return out


def deferred_share() -> tuple[int, int]:
    """(import statements inside functions, all import statements) over the package."""
    records = statements([r for path in package_files() for r in imports_of(path)])
    return sum(r.in_function for r in records), len(records)


def _module_aliases(path: Path) -> dict[str, str]:
    """{local name: internal module} for the modules a file binds to a name (``from .. import register``)."""
    tree, _ = _parse(path)
    bound = {}
    for node, _in_function, _type_checking in _walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(path, node)
            for alias in node.names:
                if base.split(".")[0] == PACKAGE_NAME and module_path(f"{base}.{alias.name}") is not None:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE_NAME + ".") and alias.asname:
                    bound[alias.asname] = alias.name
    return bound


def private_imports() -> list[str]:
    """No private name (``_x``) of one module is used by another: neither imported nor read as ``module._x``."""
    out = []
    for path in package_files():
        own = module_name(path)
        for record in imports_of(path):
            if not record.internal or record.module == own:
                continue
            name = record.name or record.module.rsplit(".", 1)[-1]
            if name.startswith("_") and not name.startswith("__"):
                out.append(f"{record.where}: imports the private name {name} from {record.module}")
        bound = _module_aliases(path)
        tree, _ = _parse(path)
        for node, _in_function, _type_checking in _walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != own):
                out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: reads the private name "
                           f"{node.attr} of {bound[node.value.id]}")
    return out


def reimports() -> list[str]:
    """No module imported inside a function when the file already imports it at the top."""
    out = []
    for path in package_files():
        records = imports_of(path)
        top = {r.module for r in records if not r.in_function and not r.type_checking}
        for record in statements([r for r in records if r.in_function]):
            if record.module in top:
                out.append(f"{record.where}: re-imports {record.module} inside a function "
                           f"(the file imports it at the top)")
    return out


def reexport_detours() -> list[str]:
    """A name is imported from the module that defines it, not via one that merely imports it.

    A package's ``__init__`` (its declared public face) may gather names; other modules may not pass them on.
    """
    out = []
    cache: dict[Path, tuple[set[str], set[str]]] = {}
    for path in package_files():
        for record in imports_of(path):
            if not record.internal or record.name is None or record.name == "*":
                continue
            source = module_path(record.module)
            if source is None or source.name == "__init__.py":
                continue
            if source not in cache:
                cache[source] = _defined_names(source)
            _defined, imported = cache[source]
            if record.name in imported:
                out.append(f"{record.where}: imports {record.name} via {record.module}, which only "
                           f"re-imports it; import it from the module that defines it")
    return out


def untyped_settings() -> list[str]:
    """A parameter that receives the run settings is declared ``settings: Settings`` (``| None`` allowed)."""
    out = []
    for path in package_files():
        tree, _ = _parse(path)
        for node, _in_function, _type_checking in _walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs:
                if arg.arg != "settings":
                    continue
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if annotation.strip("'\"") not in ("Settings", "Settings | None"):
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{arg.lineno}: {node.name}(settings: "
                               f"{annotation or 'untyped'}) - declare it Settings")
    return out


def passed_on_imports() -> list[str]:
    """A module imports a name of the package to use it, not to pass it on (``# noqa: F401`` re-exports).

    A package's ``__init__`` is exempt: gathering its public names is its job.
    """
    out = []
    for path in package_files():
        if path.name == "__init__.py":
            continue
        tree, _ = _parse(path)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom) or not node.level and not (node.module or "").startswith(
                    PACKAGE_NAME):
                continue
            for alias in node.names:
                name = alias.asname or alias.name
                if name not in used:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: imports {name} without using it "
                               f"(a re-export: let its users import it from {_absolute(path, node)})")
    return out


CHECKS = {
    "upward": upward_imports,
    "undeclared-deferred": undeclared_deferred_imports,
    "private": private_imports,
    "reimport": reimports,
    "detour": reexport_detours,
    "passed-on": passed_on_imports,
    "settings": untyped_settings,
}


def violations_by_file() -> dict[str, Counter]:
    """{check: Counter(file -> number of offences)} over the package: a summary to work from."""
    return {name: Counter(line.split(":", 1)[0] for line in check()) for name, check in CHECKS.items()}


# ----------------------------------------------------------------------------------------------------- tests
def _fail_with(offences: list[str], what: str) -> None:
    assert not offences, f"{len(offences)} {what}:\n" + "\n".join(offences)


def test_no_module_imports_a_higher_layer():
    _fail_with(upward_imports(), "imports of a higher layer")


def test_imports_inside_functions_are_few_and_say_why():
    inside, total = deferred_share()
    _fail_with(undeclared_deferred_imports(), "imports inside functions without a reason")
    assert inside < MAX_DEFERRED_SHARE * total, (
        f"{inside} of {total} imports ({inside / total:.1%}) sit inside functions; "
        f"fewer than {MAX_DEFERRED_SHARE:.0%} may (heavy optional dependencies, deferred on purpose)")


def test_no_private_name_crosses_modules():
    _fail_with(private_imports(), "private names used across modules")


def test_no_module_reimported_inside_a_function():
    _fail_with(reimports(), "re-imports inside functions")


def test_no_reexport_detours():
    _fail_with(reexport_detours(), "re-export detours")


def test_no_module_passes_imports_on():
    _fail_with(passed_on_imports(), "imports kept only to be passed on")


def test_settings_are_typed():
    _fail_with(untyped_settings(), "settings parameters not declared Settings")


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """Each check flags a small planted offence (so a passing contract is not a blind one)."""
    package = tmp_path / PACKAGE_NAME
    for folder in ("errors", "train", "explain"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "atlas.py").write_text("def load_atlas():\n    return 1\n\n\ndef _private():\n    return 2\n")
    (package / "explain" / "regions.py").write_text("from ..atlas import load_atlas\n")
    (package / "train" / "models.py").write_text(
        "import json\n"
        "from ..explain.regions import load_atlas\n"  # upward and a detour
        "from ..atlas import _private\n"  # private
        "from .. import atlas\n\n\n"
        "def f(settings, other: int = 0):\n"
        "    import json\n"  # re-import, no reason
        "    import torch  # deferred: heavy\n"
        "    return atlas._private, json, torch\n")  # private attribute
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    models = f"{PACKAGE_NAME}/train/models.py"
    assert upward_imports() == [f"{models}:2: train imports the higher layer explain ({PACKAGE_NAME}.explain.regions)"]
    assert [o.split(":")[1] for o in private_imports()] == ["3", "10"]
    assert [o.split(":")[1] for o in undeclared_deferred_imports()] == ["8"]
    assert [o.split(":")[1] for o in reimports()] == ["8"]
    assert [o.split(":")[1] for o in reexport_detours()] == ["2"]
    assert [o.split(":")[1] for o in untyped_settings()] == ["7"]
    assert [o.split(": ")[0].rsplit("/", 1)[1] for o in passed_on_imports()] == [  # none of them is used
        "regions.py:1", "models.py:2", "models.py:3"]
    assert deferred_share() == (2, 7)  # six in models.py, one in regions.py


if __name__ == "__main__":  # ``python tests/test_layers.py [-v]``: counts per check and file (-v: every offence)
    if "-v" in sys.argv:
        for check in CHECKS.values():
            print("\n".join(check()))
    inside, total = deferred_share()
    print(f"imports inside functions: {inside} of {total} ({inside / total:.1%})")
    for check, counts in violations_by_file().items():
        print(f"{check}: {sum(counts.values())}")
        for file, count in counts.most_common():
            print(f"    {count:4d}  {file}")
