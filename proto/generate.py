"""Regenerates the SDK's protobuf and gRPC modules (clients/membroker/v1) from proto/.

Used by `make proto` and by the staleness test, which generates into a temporary folder and
compares byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SOURCES = ("membroker/v1/session.proto", "membroker/v1/broker.proto")
INIT = '"""Generated protobuf and gRPC modules of the membroker v1 wire (do not edit)."""\n'


def generate(out_root: Path) -> list[Path]:
    """Writes the generated modules under out_root/membroker/v1 and returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(PROTO_DIR / s) for s in SOURCES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    pkg = out_root / "membroker" / "v1"
    (pkg / "__init__.py").write_text(INIT)
    return sorted(p for p in pkg.iterdir() if p.suffix in (".py", ".pyi"))


def main() -> int:
    written = generate(ROOT / "clients")
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
