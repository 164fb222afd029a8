"""Import layering: io/, transforms/, manifests/ and phantoms/ sit below training, inference and the rest.

The scan reads every module's syntax tree, so imports inside functions count as much as module-level ones;
``importlib.import_module("...")`` and ``__import__("...")`` with a literal name count too.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LOWER_LAYERS = ("pipelines/io", "transforms", "pipelines/manifests", "pipelines/phantoms")
UPPER_LAYERS = (
    "pipelines.training",
    "pipelines.inference",
    "pipelines.evaluation",
    "pipelines.experiments",
    "pipelines.deploy",
)
TRAINING_DATA_MODULES = ("pipelines.training.ct_data", "pipelines.training.pet_data")
#: Inference, evaluation and deployment read data through io/, manifests/ and phantoms/, not the training data lists.
DATA_CONSUMERS = ("pipelines/inference", "pipelines/evaluation", "pipelines/deploy")

#: (module file, imported module) -> why it is tolerated for now. Each entry must still occur (see below), so a
#: fixed violation has to leave the list too.
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO_ROOT) -> list[tuple[str, ...]]:
    """One entry per import in ``path`` (anywhere in the file): the absolute dotted names it may load, the
    module first (``from a import b`` gives ``("a", "a.b")``, since ``b`` may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, ...]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, *(f"{base}.{alias.name}" for alias in node.names)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value,))
    return found


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(
    folders: tuple[str, ...], forbidden: tuple[str, ...], root: Path = REPO_ROOT
) -> set[tuple[str, str]]:
    """(file, first forbidden name of the import) for every import of a forbidden module under ``folders``."""
    out = set()
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py")):
        for names in imports(path, root):
            hit = next((n for n in names if _under(n, forbidden)), None)
            if hit is not None:
                out.add((path.relative_to(root).as_posix(), hit))
    return out


def test_scan_sees_imports_inside_functions_relative_imports_and_import_module(tmp_path):
    (tmp_path / "pipelines" / "io").mkdir(parents=True)
    (tmp_path / "pipelines" / "io" / "probe.py").write_text(
        "import importlib\n"
        "from pipelines import io, training\n"
        "def f():\n"
        "    from pipelines.manifests.schema import ManifestError\n"
        "    from pipelines.training.ct_data import hu_to_8bit\n"
        "    from ..inference import ct\n"
        "    return importlib.import_module('pipelines.evaluation.explain')\n"
    )
    assert violations(("pipelines/io",), UPPER_LAYERS, root=tmp_path) == {
        ("pipelines/io/probe.py", "pipelines.training"),
        ("pipelines/io/probe.py", "pipelines.training.ct_data"),
        ("pipelines/io/probe.py", "pipelines.inference"),
        ("pipelines/io/probe.py", "pipelines.evaluation.explain"),
    }


def test_lower_layers_import_nothing_from_training_inference_evaluation_experiments_or_deploy():
    found = violations(LOWER_LAYERS, UPPER_LAYERS)
    assert found - ALLOWED.keys() == set(), "a lower layer imports an upper one; move the helper down or pass it in"
    assert ALLOWED.keys() - found == set(), "an allow-listed import is gone: remove it from ALLOWED"


def test_inference_evaluation_and_deploy_do_not_import_the_training_data_modules():
    assert violations(DATA_CONSUMERS, TRAINING_DATA_MODULES) == set()


def _config_names(prefix: str) -> set[str]:
    pattern = re.compile(rf"\b{re.escape(prefix)}(?:\.\w+)+")
    return {m for path in (REPO_ROOT / "bundles").glob("*/configs/*.json") for m in pattern.findall(path.read_text())}


@pytest.mark.parametrize("dotted", sorted(_config_names("pipelines.training")))
def test_every_training_name_a_bundle_config_references_resolves(dotted):
    module, _, attr = dotted.rpartition(".")
    try:
        importlib.import_module(dotted)
    except ModuleNotFoundError:
        assert hasattr(importlib.import_module(module), attr), f"{dotted} is referenced by a bundle config"
