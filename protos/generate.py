"""Generate the Python stubs in services/v1 from protos/jitgate/v1."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
OUT = PROTOS.parent / "services" / "v1"
HEADER = '"""Generated from protos/jitgate/v1 by `make protos`; do not edit."""\n'


def generate(out: Path) -> list[Path]:
    """Write the stubs for every .proto into out; return the files written."""
    import grpc_tools  # type: ignore[import-untyped]  # grpcio-tools ships no stubs
    from grpc_tools import protoc

    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "jitgate" / "v1").glob("*.proto")
    )
    include = Path(grpc_tools.__file__).parent / "_proto"
    # mypy-protobuf's plugins write typed .pyi stubs for messages and for the
    # grpc.aio stubs and servicers; they sit beside the interpreter running us.
    plugins = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            f"--grpc_python_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((Path(tmp) / "jitgate" / "v1").iterdir()):
            target = out / produced.name
            shutil.copyfile(produced, target)
            written.append(target)
        (out / "__init__.py").write_text(HEADER)
        written.append(out / "__init__.py")
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
