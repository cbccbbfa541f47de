"""The layer picture of DESIGN.md, read from the source: every ``import`` (top-level or inside a
function) of each package's modules is resolved to a ``fusediff.<package>`` name and checked against
the packages that layer must not import. Prints each offending import with its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"fusediff": ROOT / "python" / "fusediff", "fusediff.kernels": ROOT / "kernels"}
FORBIDDEN = {  # layer: the fusediff packages it must not import
    "kernels": {"models", "schedulers", "sampling", "pipelines", "training", "cli", "patching"},
    "models": {"schedulers", "sampling", "pipelines", "training", "cli"},
    "schedulers": {"models", "sampling", "pipelines", "training", "cli"},
    "sampling": {"pipelines", "training", "cli"},
    "training": {"pipelines", "cli"},
    "pipelines": {"training", "cli"},
}


def _module_name(path: Path) -> str:
    for package, directory in PACKAGES.items():
        if path.is_relative_to(directory) and (package != "fusediff" or not path.is_relative_to(PACKAGES["fusediff.kernels"])):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            return ".".join([package, *parts][: -1 if parts[-1] == "__init__" else None])
    raise AssertionError(path)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "fusediff" and len(parts) > 1 else None


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_design_allows(layer):
    directory = PACKAGES["fusediff.kernels"] if layer == "kernels" else PACKAGES["fusediff"] / layer
    files = sorted(directory.rglob("*.py"))
    assert files, f"no modules found for layer {layer!r} in {directory}"
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {name}" for path in files for line, name in _imports(path)
           if _layer_of(name) in FORBIDDEN[layer]]
    print("\n".join(bad))
    assert not bad, f"{layer} imports layers DESIGN.md forbids:\n" + "\n".join(bad)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """A relative import inside a function resolves to its fusediff package (so the check can fail)."""
    fake = tmp_path / "fusediff"
    (fake / "training").mkdir(parents=True)
    source = fake / "training" / "loop.py"
    source.write_text("def f():\n    from ..pipelines import DDPMPipeline\n    from . import losses\n")
    monkeypatch.setitem(PACKAGES, "fusediff", fake)
    assert _imports(source) == [(2, "fusediff.pipelines.DDPMPipeline"), (3, "fusediff.training.losses")]
