"""The package's shape: every module name once, science and serving free of the layers they must not touch."""

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raymia"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert [n for n, c in names.items() if c > 1] == []


def test_serving_reads_mlflow_only_through_the_registry():
    assert "mlflow" not in _imports(PACKAGE / "serving.py")


def test_science_and_pipeline_import_neither_ray_nor_mlflow():
    layers = ["attacks", "data", "defenses", "diffusion", "models", "training", "pipeline"]
    offenders = {str(p.relative_to(PACKAGE)): sorted(_imports(p) & {"ray", "mlflow"})
                 for layer in layers for p in (PACKAGE / layer).rglob("*.py") if _imports(p) & {"ray", "mlflow"}}
    assert offenders == {}
