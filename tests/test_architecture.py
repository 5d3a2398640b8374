"""The layers hold: no import circle, each package imports only the layers below it (tlm_base <- data_pipeline <-
tlm; the model imports nothing of training), every third-party package imported is declared in pyproject.toml,
no module grows past ~450 lines, and every training config field says what a resume may do with it."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("tlm_base", "data_pipeline", "tlm")
MAX_LINES = 450


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at its top or inside functions (a lazy import still ties the two)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if not node.level else ".".join(name.split(".")[:-node.level] + [node.module])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_no_import_circle() -> None:
    edges, state, circles = graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("layer, may_not_import", [
    ("tlm_base", ("data_pipeline", "tlm")),
    ("data_pipeline", ("tlm",)),
    ("tlm.model", ("tlm.training", "tlm.checkpointing", "tlm.studies", "tlm.cli", "data_pipeline")),
    ("tlm.checkpointing", ("tlm.training", "tlm.studies", "tlm.cli")),
    ("tlm.training", ("tlm.studies", "tlm.cli")),
])
def test_each_layer_imports_only_those_below(layer: str, may_not_import: tuple[str, ...]) -> None:
    wrong = sorted(f"{name} -> {dep}" for name, deps in graph().items() if name == layer or name.startswith(layer + ".")
                   for dep in deps if any(dep == up or dep.startswith(up + ".") for up in may_not_import))
    assert wrong == []


def test_every_third_party_import_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values()
                                              for r in extra]
    declared = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    distributions = packages_distributions()
    missing = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for top in (n.split(".")[0] for n in names):
                if top in sys.stdlib_module_names or top in PACKAGES:
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.add(f"{top} ({path.relative_to(REPO)})")
    assert sorted(missing) == []


def test_no_module_is_longer_than_a_sitting() -> None:
    long = {str(p.relative_to(REPO)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_config_field_says_what_a_resume_may_do_with_it() -> None:
    from tlm.training.config import RESUME, TrainConfig, resume_kinds

    kinds = resume_kinds()
    silent = [key for key, kind in kinds.items() if kind not in ("identity", "on_purpose", "free")]
    assert silent == [], f"say identity(...), on_purpose(...) or free(...) where these are defined: {silent}"
    sections = [f for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)
                and f.name != "model"]
    assert len(kinds) == 1 + 1 + sum(len(dataclasses.fields(f.default_factory)) for f in sections)  # name, model
    assert kinds["model"] == kinds["data.seq_len"] == kinds["train.seed"] == "identity"
    assert kinds["optim.lr"] == "on_purpose" and kinds["logging.progress"] == "free"

    @dataclasses.dataclass
    class Section:  # a field added without saying: what the test catches
        said: int = dataclasses.field(default=1, metadata={RESUME: "free"})
        unsaid: int = 2

    assert [f.name for f in dataclasses.fields(Section) if RESUME not in f.metadata] == ["unsaid"]


def test_every_config_key_is_in_the_training_docs() -> None:
    """docs/training.md's table of sections names every key (it once left out eval.at_start and final_full)."""
    from tlm.training.config import resume_kinds

    text = (REPO / "docs" / "training.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    missing = [key for key in resume_kinds() if "." in key
               and f"`{key.split('.')[1]}`" not in rows.get(key.split(".")[0], "")]
    assert missing == []
