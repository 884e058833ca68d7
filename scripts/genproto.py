"""Generate the Python modules of taskqueue's protocol and of the example.

Run from anywhere: ``python scripts/genproto.py [OUT_ROOT]``. Without OUT_ROOT
the modules are written into the source tree; a test generates them into a
temporary folder and compares them with the committed ones.
"""

import shutil
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    include: str  # proto root, relative to the repository
    protos: tuple[str, ...]
    out: str  # output root, relative to the repository
    outputs: tuple[str, ...]


TARGETS = (
    Target(
        "proto",
        ("taskqueue/protobuf/service.proto", "taskqueue/protobuf/admin.proto"),
        ".",
        ("python", "pyi_mypy", "grpclib_python", "grpc_python", "mypy_grpc"),
    ),
    Target(
        "examples/cafe",
        ("cafe.proto",),
        "examples/cafe",
        ("python", "pyi_mypy", "grpclib_python"),
    ),
)


def _plugin(name: str) -> str:
    binary = shutil.which(f"protoc-gen-{name}", path=str(Path(sys.executable).parent))
    if binary is None:
        raise SystemExit(f"protoc-gen-{name} is not installed beside {sys.executable}")
    return f"--plugin=protoc-gen-{name}={binary}"


def _output_args(outputs: tuple[str, ...], out_dir: Path) -> list[str]:
    args = []
    for output in outputs:
        flag = "mypy" if output == "pyi_mypy" else output
        if flag in ("grpclib_python", "mypy", "mypy_grpc"):
            args.append(_plugin(flag))
        args.append(f"--{flag}_out={out_dir}")
    return args


def generate(out_root: Path) -> None:
    well_known = files("grpc_tools") / "_proto"
    for target in TARGETS:
        out_dir = out_root / target.out
        out_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"-I{ROOT / target.include}",
            f"-I{well_known}",
            *_output_args(target.outputs, out_dir),
            *target.protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {target.include}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
