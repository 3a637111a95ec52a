"""The package layering of src/mcdm (tools/architecture.py): dependencies point downward only, no mcdm
import hides inside a function, no source file is over 500 lines, and README's diagram is the code's."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architecture", ROOT / "tools" / "architecture.py")
architecture = importlib.util.module_from_spec(_spec)
sys.modules["architecture"] = architecture
_spec.loader.exec_module(architecture)


def test_the_package_layering_holds():
    assert architecture.violations() == []


def test_every_package_has_a_layer():
    packages = {p.name.removesuffix(".py") for p in architecture.SRC.iterdir()
                if p.suffix == ".py" and p.name != "__init__.py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert packages <= set(architecture.LAYER_OF), packages - set(architecture.LAYER_OF)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "mcdm"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_upward_same_layer_hidden_and_dynamic_imports_are_caught(tmp_path):
    src = _tree(tmp_path, {
        "models/__init__.py": "",
        "models/unet.py": "from mcdm.config import Params\nfrom mcdm.face.geometry import x\n",  # banned, allowed
        "train/__init__.py": "",
        "train/stage.py": "def f():\n    from mcdm.models.unet import Net\n",  # downward but inside a function
        "eval/__init__.py": "",
        "eval/report.py": "from mcdm.train.stage import f\n",  # same layer
        "data/__init__.py": "",
        "data/ingest.py": "import importlib\nimportlib.import_module('mcdm.models')\nfrom mcdm.train import x\n",
        "face/__init__.py": "",
        "face/big.py": "x = 1\n" * 501,
    })
    found = "\n".join(architecture.violations(src))
    assert "models/unet.py:1: models imports mcdm.config (the params schema stays out of models)" in found
    assert "face.geometry" not in found
    assert "train/stage.py:2: import of mcdm.models.unet inside a function" in found
    assert "eval/report.py:1: eval imports mcdm.train.stage (same layer)" in found
    assert "data/ingest.py:2: dynamic import" in found
    assert "data/ingest.py:3: data imports mcdm.train (upward)" in found
    assert "face/big.py: 501 lines > 500" in found


def test_readme_diagram_is_drawn_from_the_code():
    committed = architecture.readme_diagram()
    assert committed is not None, "README.md lost its architecture block"
    assert committed == architecture.readme_block(architecture.package_graph()), \
        "README's diagram is stale: run `python tools/architecture.py --write`"
