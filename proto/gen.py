"""Regenerate the committed Python modules from ``proto/*.proto``.

    python -m proto.gen            # rewrite proto/*_pb2*.py in place
    python -m proto.gen --out DIR  # write them into DIR instead (for checks)

The generated gRPC module imports ``replication_pb2`` as a top-level module;
it is rewritten to a package-relative import so ``proto.replication_pb2_grpc``
works from anywhere.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("replication.proto",)


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")
        stem = name.removesuffix(".proto")
        grpc_mod = out_dir / f"{stem}_pb2_grpc.py"
        text = grpc_mod.read_text()
        text = re.sub(rf"^import {stem}_pb2 as ", f"from . import {stem}_pb2 as ", text, flags=re.M)
        grpc_mod.write_text(text)
        written += [out_dir / f"{stem}_pb2.py", grpc_mod]
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proto.gen", description=__doc__)
    p.add_argument("--out", type=Path, default=PROTO_DIR)
    args = p.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
