"""A private copy of a project tree (its git repo, DVC cache and outputs), for tests that change it.

``micro_pipeline`` (conftest) is shared by the whole session; a test that runs commands there that
write (dvc exp run, dvc push, services with pid files) works on ``copy_tree(micro_pipeline, tmp)``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

#: left out of a copy: DVC's locks and scratch (.dvc/tmp), services' pid files and logs (run/, .prefect/)
SKIP = {".dvc": {"tmp"}, ".": {"run", ".prefect"}}


def copy_tree(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` (which must not exist); symlinks stay links, mtimes are kept."""
    src = Path(src).resolve()

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).resolve().relative_to(src).as_posix()
        return SKIP.get(rel, set()) & set(names)

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return Path(dest)
