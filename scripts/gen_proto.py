"""Generate the Python code for proto/tensorcache.proto.

The one way generated code is produced (``make proto``). protoc runs over a
temporary tree laid out as the import package (``tensorcache/proto/``) so the
generated ``*_pb2_grpc.py`` imports ``tensorcache.proto.tensorcache_pb2``
instead of a bare top-level module. ``--check`` regenerates into a temporary
folder and fails when the committed files differ (tests/unit/test_proto.py).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = ("tensorcache.proto",)
OUTPUTS = ("tensorcache_pb2.py", "tensorcache_pb2.pyi", "tensorcache_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tensorcache" / "proto"
        tree.mkdir(parents=True)
        for name in PROTOS:
            shutil.copy(PROTO_DIR / name, tree / name)
        for name in PROTOS:
            rc = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{tmp}",
                    f"--python_out={tmp}",
                    f"--pyi_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(tree / name),
                ]
            )
            if rc != 0:
                raise SystemExit(f"protoc failed on {name} (exit {rc})")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy(tree / name, out_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(PROTO_DIR)
        print(f"generated {', '.join(OUTPUTS)} in {PROTO_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            n
            for n in OUTPUTS
            if not (PROTO_DIR / n).exists()
            or not filecmp.cmp(Path(tmp) / n, PROTO_DIR / n, shallow=False)
        ]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
