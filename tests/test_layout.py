"""The layout's rules, read from the source: who may import whom, no cycles, small modules.

One home per job (README "Where each job lives"): ``contract`` is what training,
calibration and the gateway share and imports none of them; ``training`` builds
models on the contract; ``calibration`` is the online path, built on both;
``serving`` is the gateway, which uses the contract and calibration's public
names and never the trainers. ``imgserve`` is the product's command line on top
of them all, the one package that may import training, calibration and serving
together, and that none of them imports. Every ``import`` counts, including the
ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "training", "calibration", "serving", "imgserve")

#: Which project packages each package may import (besides itself).
ALLOWED = {
    "contract": set(),
    "training": {"contract"},
    "calibration": {"contract", "training"},
    "serving": {"contract", "calibration"},
    # The top layer: each command is a thin adapter over the package that owns the job.
    "imgserve": {"contract", "training", "calibration", "serving"},
}
#: The single sanctioned breach: ``python -m training`` predates ``imgserve`` and still
#: offers calibration's ``calibrate``/``promote``/``rollback`` subcommands.
EXCEPTIONS = {("training.cli", "calibration.cli")}
#: Generated code is not held to the size limit.
GENERATED = ("serving/proto/",)
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the project."""

    importer: str
    target: str  # the deepest project module the statement names
    names: tuple[str, ...]  # names taken from it (``from x import a, b``)
    line: int


def module_files() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> Iterator[Import]:
    """The project modules ``name`` imports, with the names it takes from each."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield Import(name, _deepest(alias.name), (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, path.name == "__init__.py")
            if module.split(".")[0] not in PACKAGES:
                continue
            plain = []
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in MODULES:  # ``from serving import drift``: the submodule
                    yield Import(name, sub, (), node.lineno)
                else:
                    plain.append(alias.name)
            if plain:
                yield Import(name, _deepest(module), tuple(plain), node.lineno)


def _deepest(dotted: str) -> str:
    parts = dotted.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or dotted


ALL_IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def test_the_module_walk_sees_the_packages():
    # The rules below are vacuous if the walk finds nothing.
    assert {name.split(".")[0] for name in MODULES} == set(PACKAGES)
    assert len(ALL_IMPORTS) > 100


def test_each_package_imports_only_what_its_layer_allows():
    breaches = []
    for imp in ALL_IMPORTS:
        own, other = imp.importer.split(".")[0], imp.target.split(".")[0]
        if other == own or other in ALLOWED[own]:
            continue
        if (imp.importer, imp.target) in EXCEPTIONS:
            continue
        breaches.append(f"{imp.importer}:{imp.line} imports {imp.target}")
    assert not breaches, "\n".join(breaches)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_aliases(name: str, path: Path) -> dict[str, str]:
    """Local names bound to project modules: ``import a.b as m``, ``from a import b as m``."""
    bound = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, path.name == "__init__.py")
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{module}.{alias.name}"
    return bound


def private_uses(name: str, path: Path) -> Iterator[str]:
    """``from m import _x`` and ``m._x`` where ``m`` is another project module."""
    for imp in imports_of(name, path):
        for taken in imp.names:
            if _private(taken) and imp.target != name:
                yield f"{name}:{imp.line} takes {taken} from {imp.target}"
    aliases = module_aliases(name, path)
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            yield f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"


def test_no_module_uses_another_modules_private_names():
    used = [use for name, path in MODULES.items() for use in private_uses(name, path)]
    assert not used, "\n".join(used)


def test_the_private_name_check_sees_both_forms(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from contract.bn import _hidden\nfrom contract import bn as b\nb._other()\nb.public()\n"
    )
    found = list(private_uses("serving.probe", source))
    assert [use.split(" ", 1)[1] for use in found] == [
        "takes _hidden from contract.bn",
        "uses contract.bn._other",
    ]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_modules_import_each_other():
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in ALL_IMPORTS:
        if imp.target in MODULES and imp.target != imp.importer:
            edges[imp.importer].add(imp.target)
    assert _cycles(edges) == []


def test_the_cycle_finder_sees_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    path = MODULES[name]
    if str(path.relative_to(REPO_ROOT)).startswith(GENERATED):
        pytest.skip("generated code")
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO_ROOT)} has {lines} lines"


def test_test_files_import_helpers_not_other_tests():
    # Shared test code lives in tests/helpers/ (or a package's non-test helper module);
    # importing a test file or a conftest runs its fixtures and tests twice.
    breaches = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                last = target.split(".")[-1]
                if target.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    breaches.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {target}")
    assert not breaches, "\n".join(breaches)
