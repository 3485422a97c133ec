"""The layout's rules: the layers of pyproject.toml's import-linter contracts hold, no two modules import
each other round (however long the way), no source file grows past 450 lines, and every package is listed
for the wheel."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "datasets", "tasks", "flows", "infra")
MAX_LINES = 450


def test_imports_keep_the_layer_contracts():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_no_import_cycle_between_modules():
    import grimp

    # In-function and TYPE_CHECKING imports count: they are imports all the same.
    graph = grimp.build_graph("blipdiff", cache_dir=None)
    cycles = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycle = (importer, *back)  # ends where it starts
                start = cycle.index(min(cycle[:-1]))
                cycles.add(cycle[start:-1] + cycle[:start + 1])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in sorted(cycles))


def test_no_source_file_over_450_lines():
    long = {str(path.relative_to(REPO)): count for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_package_is_in_the_wheel():
    # The editable install maps the whole folder, so a package missing from the list passes every other
    # test and is absent only from a wheel.
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("blipdiff", *init.parent.relative_to(REPO).parts)) for package in PACKAGES
             for init in (REPO / package).rglob("__init__.py")}
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"
