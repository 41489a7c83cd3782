"""The layout of docs/architecture.md: every import points down the stack, none back, none in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Higher imports lower, never the reverse; parts of one rank do not import each other.
RANK = {
    "ingest.__main__": 7, "ingest.cli": 6, "ingest.server": 5, "ingest.http": 4, "ingest.admin": 3,
    "ingest.pipeline": 2, "ingest.worker": 2, "ingest": 1,
    "storage": 0, "crypto": 0, "policy": -1,
}
OURS = ("ingest", "storage", "crypto", "policy")


def part(module: str) -> str:
    """The layer a module belongs to: ingest.http.routes.core -> ingest.http; ingest.keys -> ingest."""
    pieces = module.split(".")
    if pieces[0] == "ingest" and len(pieces) > 1 and f"ingest.{pieces[1]}" in RANK:
        return f"ingest.{pieces[1]}"
    return pieces[0]


def imports(tree: ast.AST):
    """(line, module) of every import of our packages, outside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in OURS:
            if node.module in ("ingest", "ingest.cli", "ingest.http", "ingest.http.routes", "ingest.admin"):
                for alias in node.names:  # `from ingest.cli import address` imports ingest.cli.address
                    yield node.lineno, f"{node.module}.{alias.name}" if alias.name != "version" else node.module
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    yield node.lineno, alias.name


def test_every_import_points_down_the_layers():
    wrong = []
    files = [p for package in OURS for p in (ROOT / package).rglob("*.py")]
    assert len(files) > 60
    for path in files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        here = part(module)
        for line, target in imports(ast.parse(path.read_text(encoding="utf-8"))):
            there = part(target)
            if there != here and RANK[here] <= RANK[there]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_layers_are_the_folders_the_architecture_names():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in RANK:
        folder = name.replace(".", "/")
        if name in ("ingest", "ingest.server", "ingest.__main__"):
            continue
        assert (ROOT / folder).is_dir(), folder
        assert f"{folder}/" in text, f"docs/architecture.md does not name {folder}/"
