"""Type-check the whole ``tensorcache`` namespace with mypy (settings in pyproject.toml).

The namespace is spread over several folders (pyproject.toml's package-dir
mapping), which mypy cannot follow, so this lays it out as one tree of
symlinks (the same layout scripts/lint_imports.py checks the layering on)
and runs mypy there. Strict on the core and the client, the layers users'
code touches; the ordinary checks elsewhere ([tool.mypy] in pyproject.toml).
Arguments are passed on.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from lint_imports import ROOT, lay_out


def main(argv: list[str]) -> int:
    mypy = Path(sys.executable).parent / "mypy"
    with tempfile.TemporaryDirectory(prefix="tensorcache-types-") as tmp:
        lay_out(Path(tmp))
        config = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", "/dev/null"]
        return subprocess.call([str(mypy), *config, "-p", "tensorcache", *argv], cwd=tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
