"""The package layering of ``src/mcdm``, read from the code: who imports whom, and the rules.

    python tools/architecture.py            # check; print the package graph and any violation
    python tools/architecture.py --write    # also redraw docs/architecture.png and README's diagram

Rules (tests/test_architecture.py enforces them on every run of the suite):

1. Dependencies point downward: a package imports only packages of LOWER layers (``LAYERS``), never one
   of its own layer or above, so eval and train never import each other and only ``experiments``
   stands above both; and ``models``, ``face`` and ``media`` do not import the params schema
   (``FORBIDDEN``): models know no files, MLflow, training or params.
2. No ``mcdm`` import inside a function (a cycle dodged at import time is still a cycle), and no
   ``importlib`` import of ``mcdm`` modules except the command dispatch of ``cli.py``.
3. No source file over ``MAX_LINES`` lines.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mcdm"
MAX_LINES = 500
DISPATCH = {"cli.py"}  # the one module allowed to import mcdm modules by name at run time

# Bottom to top. Each entry: (layer name, packages or top-level modules of src/mcdm, what they hold).
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("errors", ("errors", "logs"), "the one-line user error; logging set-up"),
    ("config", ("config",), "the params schema: every key and default, once"),
    ("leaves", ("media", "face", "benchmark_results"),
     "media: PyAV / soundfile I/O, atomic writes, the models/ and bundle folder layout; "
     "face: dlib / SCRFD detection, tracks and crops, landmark geometry"),
    ("models", ("models",), "networks, tensors in and out: UNet, attentions, priors, encoders, VAE helpers, SyncNet"),
    ("pipelines, data, tracking", ("pipelines", "data", "tracking"),
     "pipelines: generation (load, preprocess, clip by clip); data: the data stages; tracking: MLflow runs and registry"),
    ("train, eval", ("train", "eval"),
     "train: one engine, builders, the stages, base models, motion encoders, SyncNet; eval: metrics, evaluate, report"),
    ("experiments", ("experiments",), "ablation and sweep members: train, then evaluate"),
    ("demo", ("demo",), "the Gradio web demo over generate_video()"),
    ("entry points", ("commands", "services"), "one thin module per `mcdm` command; the local MLflow / Prefect services"),
    ("cli", ("cli",), "`mcdm <command>`: the command table"),
]
LAYER_OF = {pkg: i for i, (_, pkgs, _) in enumerate(LAYERS) for pkg in pkgs}
# Downward, yet not allowed: the networks and the leaves know no params schema (builders in train/ turn
# params into constructor arguments; face/ and media/ take plain arguments).
FORBIDDEN = {"models": ("config",), "face": ("config",), "media": ("config",)}


@dataclass(frozen=True)
class Import:
    file: str  # relative to src/mcdm
    line: int
    source: str  # package (or top-level module) of the importing file
    target: str  # package (or top-level module) imported
    module: str  # the full module named
    in_function: bool


def package_of(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def imports(src: Path = SRC) -> list[Import]:
    """Every import of an ``mcdm`` module in the package."""
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mcdm"):
                names = [f"mcdm.{a.name}" for a in node.names] if node.module == "mcdm" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("mcdm.")]
            else:
                continue
            for module in names:
                target = module.split(".")[1]
                found.append(Import(str(rel), node.lineno, package_of(rel), target, module, id(node) in inner))
    return found


def dynamic_imports(src: Path = SRC) -> list[tuple[str, int]]:
    """``importlib.import_module(...)`` / ``__import__(...)`` calls outside ``DISPATCH``."""
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if str(rel) in DISPATCH:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("import_module", "__import__"):
                    found.append((str(rel), node.lineno))
    return found


def violations(src: Path = SRC) -> list[str]:
    """Every broken rule, one line each (empty: the layering holds)."""
    out = []
    for imp in imports(src):
        if imp.in_function:
            out.append(f"{imp.file}:{imp.line}: import of {imp.module} inside a function")
        if imp.target == imp.source:
            continue
        if imp.source not in LAYER_OF or imp.target not in LAYER_OF:
            unknown = imp.source if imp.source not in LAYER_OF else imp.target
            out.append(f"{imp.file}:{imp.line}: {unknown} is in no layer of tools/architecture.py")
        elif imp.target in FORBIDDEN.get(imp.source, ()):
            out.append(f"{imp.file}:{imp.line}: {imp.source} imports {imp.module} (the params schema stays out of "
                       f"{imp.source})")
        elif LAYER_OF[imp.target] >= LAYER_OF[imp.source]:
            out.append(f"{imp.file}:{imp.line}: {imp.source} imports {imp.module} "
                       f"({'same layer' if LAYER_OF[imp.target] == LAYER_OF[imp.source] else 'upward'})")
    out += [f"{file}:{line}: dynamic import outside {', '.join(sorted(DISPATCH))}" for file, line in dynamic_imports(src)]
    for path in sorted(src.rglob("*.py")):
        n = path.read_text(encoding="utf-8").count("\n")
        if n > MAX_LINES:
            out.append(f"{path.relative_to(src)}: {n} lines > {MAX_LINES}")
    return out


def package_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Package -> the packages it imports (``errors`` left out: everything may raise it)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports(src):
        if imp.target != imp.source and imp.target != "errors":
            graph[imp.source].add(imp.target)
    return {k: graph[k] for k in sorted(graph)}


def mermaid(graph: dict[str, set[str]]) -> str:
    """The layers as subgraphs (top layer first) and one arrow per package import."""
    lines = ["flowchart TB"]
    for i, (name, pkgs, _) in reversed(list(enumerate(LAYERS))):
        members = [p for p in pkgs if p != "errors"]
        if not members:
            continue
        lines.append(f'  subgraph L{i}["{name}"]')
        lines += [f"    {p}" for p in members]
        lines.append("  end")
    for source, targets in graph.items():
        lines += [f"  {source} --> {t}" for t in sorted(targets)]
    return "\n".join(lines)


README_BEGIN = "<!-- architecture:begin (tools/architecture.py --write) -->"
README_END = "<!-- architecture:end -->"


def readme_block(graph: dict[str, set[str]]) -> str:
    return f"{README_BEGIN}\n```mermaid\n{mermaid(graph)}\n```\n{README_END}"


def readme_diagram(readme: Path = ROOT / "README.md") -> str | None:
    """The diagram block in the README as committed (None when there is none)."""
    m = re.search(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), readme.read_text(encoding="utf-8"), re.S)
    return m.group(0) if m else None


def draw(graph: dict[str, set[str]], out: Path) -> Path:
    """A PNG of the layers (top layer at the top) with one arrow per package import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, [p for p in pkgs if p != "errors"]) for name, pkgs, _ in LAYERS]
    rows = [r for r in rows if r[1]]
    pos = {}
    for y, (_, pkgs) in enumerate(rows):
        for x, pkg in enumerate(pkgs):
            pos[pkg] = ((x + 1) / (len(pkgs) + 1), y)
    fig, ax = plt.subplots(figsize=(9, 7.5))
    for source, targets in graph.items():
        for target in targets:
            (x0, y0), (x1, y1) = pos[source], pos[target]
            ax.annotate("", xy=(x1, y1 + 0.18), xytext=(x0, y0 - 0.18),
                        arrowprops=dict(arrowstyle="->", color="#8899aa", lw=0.8, shrinkA=2, shrinkB=2,
                                        connectionstyle="arc3,rad=0.08"))
    for y, (name, pkgs) in enumerate(rows):
        ax.text(-0.02, y, name, ha="right", va="center", fontsize=8, color="#555555")
        for pkg in pkgs:
            x, _ = pos[pkg]
            ax.text(x, y, pkg, ha="center", va="center", fontsize=10,
                    bbox=dict(boxstyle="round,pad=0.35", fc="#eef3fb", ec="#3a6ea5"))
    ax.set_xlim(-0.25, 1.0)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.axis("off")
    ax.set_title("src/mcdm: packages by layer; arrows are imports (always downward)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="redraw docs/architecture.png and README's diagram")
    args = parser.parse_args(argv)
    graph = package_graph()
    for source, targets in graph.items():
        print(f"{source:18s} -> {', '.join(sorted(targets))}")
    if args.write:
        draw(graph, ROOT / "docs" / "architecture.png")
        readme = ROOT / "README.md"
        text = readme.read_text(encoding="utf-8")
        current = readme_diagram(readme)
        if current is None:
            print("README.md has no architecture block to update", file=sys.stderr)
            return 1
        readme.write_text(text.replace(current, readme_block(graph)), encoding="utf-8")
        print("wrote docs/architecture.png and README.md's diagram")
    problems = violations()
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
