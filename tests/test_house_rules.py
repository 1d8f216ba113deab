"""House rules that a scan of the source can check (CONTRIBUTING.md, "Façades and private names").

A private name (one leading underscore, not a dunder) is private to the module or package that
holds it. ``from memguard.a.b import _x`` is allowed only inside the scope of its first private
component: the scope of ``_x`` (a name in module ``memguard.a.b``) is that module, so nothing else
may import it; the scope of a private module (``memguard/cli/_shared.py``) is its package, so
``memguard/cli/*`` may import it and any of its names, private or not. A test file counts as the
module it mirrors (``tests/cli/test_cli.py`` is inside ``memguard.cli``; a top-level test file,
such as ``tests/test_fit.py``, is inside ``memguard``): the tests of a package may import its private
modules, never a module's ``_name``. ``import memguard.x._y`` is read the same way.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(path: Path, root: Path) -> tuple[list[str], list[str]]:
    """The dotted module a file is (a test file: the one it mirrors) and the package it resolves ``.`` in."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "tests":
        parts[0] = "memguard"
    package = parts[:-1]
    if parts[-1] == "__init__":
        parts = package
    return parts, package


def _imported(node: ast.AST, package: list[str]) -> list[list[str]]:
    """The dotted paths an import statement names (``from a.b import c``: ``a.b.c``)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".") for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = package[:len(package) - node.level + 1] if node.level else []
        module = base + (node.module.split(".") if node.module else [])
        return [[*module, alias.name] for alias in node.names]
    return []


def crossings(paths: list[Path], root: Path = ROOT) -> set[tuple[str, str]]:
    """(file, dotted name) for each private memguard name imported outside its scope."""
    found = set()
    for path in paths:
        module, package = _module_of(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, package):
                first = next((i for i, part in enumerate(name) if _private(part)), None)
                if name[0] != "memguard" or first is None:
                    continue
                if module[:first] != name[:first]:
                    found.add((path.relative_to(root).as_posix(), ".".join(name)))
    return found


def _sources() -> list[Path]:
    return sorted([*(ROOT / "memguard").rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


def test_no_private_name_crosses_a_module_boundary() -> None:
    found = crossings(_sources())
    assert found == set(), "import a public name, or move the caller (CONTRIBUTING.md)"


def test_the_rule_reads_each_kind_of_import(tmp_path: Path) -> None:
    """The scan itself: what it flags and what it lets through, on files written here."""
    files = {
        "memguard/cli/__init__.py": "from memguard.cli._shared import _helper, shared\nfrom ._parser import x\n",
        "memguard/run_config.py": "from memguard.lightning.run import _skeleton, peek\n",
        "memguard/device/spec.py": "from . import _nvml\nfrom .readers import _cache\n"
                                   "import memguard.device._host\n",
        "memguard/estimation/trace/record.py": "from ..allocator import _Block\nfrom .ledger import ledger\n",
        "tests/device/test_x.py": "from memguard.device import _nvml\nfrom memguard.device.readers import _y\n",
        "tests/cli/test_y.py": "from memguard.device._nvml import shutdown\nfrom memguard.cli import _parser\n",
        "tests/test_z.py": "from memguard._cache import cached\nfrom memguard.fit import _usable\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = crossings(sorted(tmp_path.rglob("*.py")), tmp_path)
    assert found == {
        ("memguard/run_config.py", "memguard.lightning.run._skeleton"),
        ("memguard/device/spec.py", "memguard.device.readers._cache"),
        ("memguard/estimation/trace/record.py", "memguard.estimation.allocator._Block"),
        ("tests/device/test_x.py", "memguard.device.readers._y"),
        ("tests/cli/test_y.py", "memguard.device._nvml.shutdown"),
        ("tests/test_z.py", "memguard.fit._usable"),
    }


MAX_FUNCTION_LINES = 60
"""CONTRIBUTING.md, rule 6: lines from ``def`` to a function's end, its docstring not counted."""


def long_functions(paths: list[Path], root: Path = ROOT) -> set[tuple[str, str, int]]:
    """(file, function, lines) for each function (or method, or nested function) over
    :data:`MAX_FUNCTION_LINES` lines of code, and (file, function, 0) for each whose docstring
    apologises for its length."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            doc_lines = node.body[0].end_lineno - node.body[0].lineno + 1 if doc is not None else 0
            lines = node.end_lineno - node.lineno + 1 - doc_lines
            name = path.relative_to(root).as_posix()
            if lines > MAX_FUNCTION_LINES:
                found.add((name, node.name, lines))
            if doc is not None and "(Long" in doc:
                found.add((name, node.name, 0))
    return found


def test_no_function_in_the_package_is_over_60_lines() -> None:
    found = long_functions(sorted((ROOT / "memguard").rglob("*.py")))
    assert found == set(), "split it by meaning (CONTRIBUTING.md, rule 6)"


def test_the_length_rule_counts_code_not_the_docstring(tmp_path: Path) -> None:
    """The scan itself, on functions written here: 60 lines of code pass, 61 do not, however long the
    docstring; a method counts on its own; an apology is flagged at any length."""
    def function(name: str, lines: int, doc: int = 0, indent: str = "") -> str:
        """``def`` and ``lines - 1`` statements, after a docstring of ``doc`` lines."""
        docstring = [f'{indent}    """Doc.', *[f"{indent}    more" for _ in range(doc - 2)], f'{indent}    """']
        return "\n".join([f"{indent}def {name}() -> None:", *(docstring if doc else []),
                          *[f"{indent}    x = {i}" for i in range(lines - 1)]]) + "\n"

    text = (function("sixty", 60, doc=40) + function("sixty_one", 61)
            + "class C:\n" + function("method", 61, indent="    ")
            + 'def sorry() -> None:\n    """(Long, but one pipeline.)"""\n')
    (tmp_path / "memguard").mkdir()
    (tmp_path / "memguard" / "m.py").write_text(text)
    assert long_functions([tmp_path / "memguard" / "m.py"], tmp_path) == {
        ("memguard/m.py", "sixty_one", 61), ("memguard/m.py", "method", 61), ("memguard/m.py", "sorry", 0)}


def test_every_str_enum_derives_from_the_one_base() -> None:
    """A closed set of names is a :class:`memguard.enums.StrEnum` (its ``str()`` is its value), never a
    class of its own over ``(str, enum.Enum)``, whose ``str()`` differs."""
    own = []
    for path in sorted((ROOT / "memguard").rglob("*.py")):
        if path.name == "enums.py" and path.parent.name == "memguard":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if "str" in bases and bases & {"enum.Enum", "Enum"}:
                    own.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert own == []
