"""Check the layering contracts: ``lint-imports`` over the whole ``tensorcache`` namespace.

The contracts live in pyproject.toml ([tool.importlinter]). The namespace is
spread over several folders (pyproject.toml's [tool.setuptools] package-dir
maps tensorcache.node to node/, tensorcache.router to router/, ...), but
grimp, which import-linter builds its import graph with, finds subpackages
only by walking the root package's folder: run in this repository,
``lint-imports`` would see tensorcache/ alone and fail for want of
tensorcache.node. So this script lays the namespace out as one tree of
symlinks in a temporary folder, from the same mapping, and runs
``lint-imports`` there (its working directory comes first on sys.path, ahead
of the editable install). Arguments are passed on (e.g. ``--verbose``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """Package name -> its folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {package: ROOT / folder for package, folder in mapping.items()}


def lay_out(dest: Path) -> None:
    """The namespace under ``dest`` as the installed package would have it."""
    for package, folder in sorted(package_dirs().items()):  # parents before children
        path = dest.joinpath(*package.split("."))
        if path.is_symlink():  # its folder lies in its parent's, already linked
            continue
        if "." in package:
            path.symlink_to(folder, target_is_directory=True)
            continue
        # The root: a real folder to hang the mapped subpackages in.
        path.mkdir()
        for entry in folder.iterdir():
            if entry.name != "__pycache__":
                (path / entry.name).symlink_to(entry)


def main(argv: list[str]) -> int:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    with tempfile.TemporaryDirectory(prefix="tensorcache-layering-") as tmp:
        lay_out(Path(tmp))
        config = ["--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"]
        return subprocess.call([str(lint_imports), *config, *argv], cwd=tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
