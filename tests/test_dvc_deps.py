"""dvc.yaml's stage deps cover every pairtune module each stage script can import (lazily or not)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from .conftest import ROOT

SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    """The file of a pairtune module or package, relative to the repository root."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT)
    return None


def imported_names(path: Path) -> set[str]:
    """Every ``pairtune`` module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pairtune import tracking`
    return {name for name in names if name.split(".")[0] == "pairtune"}


def import_closure(script: str) -> set[Path]:
    """The pairtune files a stage script can run: its imports, theirs, and every package's ``__init__``."""
    seen: set[Path] = set()
    todo = [Path(script)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                found = module_file(".".join(parts[:end]))
                if found and found not in seen:
                    todo.append(found)
    return {path for path in seen if path.parts[0] == "src"}


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)


def test_every_stage_depends_on_all_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        closure = import_closure(f"pipelines/{name}.py")
        assert closure, name
        gaps = sorted(str(path) for path in closure if not covered(path, stage["deps"]))
        if gaps:
            missing[name] = gaps
    assert not missing, f"dvc.yaml misses deps: {missing}"


def test_the_card_template_is_a_dep_of_train():
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert covered(Path("src/pairtune/outputs/templates/model_card.md.j2"), deps)


def test_the_closure_finds_lazy_imports_and_packages():
    train = import_closure("pipelines/train.py")
    assert Path("src/pairtune/model/unpad.py") in train  # imported by training.py
    assert Path("src/pairtune/outputs/card.py") in train  # imported inside a function
    assert Path("src/pairtune/tracking/__init__.py") in train and Path("src/pairtune/tracking/run.py") in train
    prepare = import_closure("pipelines/prepare.py")
    assert Path("src/pairtune/train/training.py") not in prepare and Path("src/pairtune/model/unpad.py") not in prepare
