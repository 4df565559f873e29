"""The repository's layout: one part per deployable over a shared core, imports going one way, and
the README's layout section naming what is really there."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each part: where its modules live, and the parts it may import.
PARTS = {
    "core": ("src/morgana/core", set()),
    "api": ("src/morgana/api", {"core"}),
    "agent": ("src/morgana/agent", {"core"}),
    "controller": ("controller/morgana_controller", {"core"}),
    "devtools": ("devtools/morgana_devtools", {"core", "api", "agent"}),
}
PRODUCT = {"core", "api", "agent", "controller"}


def part_of_module(name: str) -> str | None:
    if name == "morgana" or name.startswith("morgana."):
        parts = name.split(".")
        if len(parts) == 1:
            return "core"  # the distribution's __init__ (its version)
        return {"core": "core", "api": "api", "agent": "agent"}.get(parts[1], "core")
    top = name.split(".")[0]
    return {"morgana_controller": "controller", "morgana_devtools": "devtools", "tests": "tests", "bench": "bench"}.get(
        top
    )


def imports_of(path: Path) -> set[str]:
    """Every absolute module an import statement names, lazy (in-function) imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def import_graph() -> dict[str, set[str]]:
    """Part -> the other parts its modules import."""
    graph: dict[str, set[str]] = {}
    for part, (directory, _) in PARTS.items():
        edges = graph.setdefault(part, set())
        for path in (ROOT / directory).rglob("*.py"):
            for name in imports_of(path):
                target = part_of_module(name)
                if target and target != part:
                    edges.add(target)
    return graph


def test_imports_only_go_down_and_the_product_never_imports_dev_support() -> None:
    graph = import_graph()
    for part, (_, allowed) in PARTS.items():
        assert graph[part] <= allowed, f"{part} imports {sorted(graph[part] - allowed)}"
    for part in PRODUCT:
        assert not graph[part] & {"devtools", "tests", "bench"}, part
    # The agent reaches the API over HTTP only; the controller knows neither.
    assert "api" not in graph["agent"] and not graph["controller"] & {"api", "agent"}


def test_the_import_check_sees_lazy_imports_of_every_part(tmp_path: Path) -> None:
    module = tmp_path / "sample.py"
    module.write_text("import morgana.api.main\n\ndef later():\n    from morgana_devtools.services import eventually\n")
    assert {part_of_module(name) for name in imports_of(module)} == {"api", "devtools"}
    assert part_of_module("morgana") == "core" and part_of_module("morgana_controller.cli") == "controller"


def readme_layout_paths() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Development", 1)[1]
    block = section.split("```", 2)[1]
    paths = []
    for line in block.splitlines():
        entry = line.split("  ", 1)[0].strip()
        if entry and not line.startswith(" "):
            # "a/{b,c}/" names a/b/ and a/c/; "x, y" names both.
            braced = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", entry)
            if braced:
                paths.extend(braced[1] + choice + braced[3] for choice in braced[2].split(","))
            else:
                paths.extend(part.strip() for part in entry.split(","))
    return paths


@pytest.mark.parametrize("entry", readme_layout_paths())
def test_every_path_in_the_readme_layout_exists(entry: str) -> None:
    assert (ROOT / entry).exists(), f"README's layout names {entry}, which does not exist"


def test_every_top_level_entry_is_in_the_readme_layout() -> None:
    listed = {entry.split("/")[0] for entry in readme_layout_paths()}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top_level = {line.split("/")[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    assert top_level - listed == set(), f"top-level directories the README's layout does not name: {top_level - listed}"
