"""The committed generated modules are exactly what scripts/genproto.py makes."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = [
    "taskqueue/protobuf/service_pb2.py",
    "taskqueue/protobuf/service_pb2.pyi",
    "taskqueue/protobuf/service_grpc.py",
    "taskqueue/protobuf/service_pb2_grpc.py",
    "taskqueue/protobuf/service_pb2_grpc.pyi",
    "taskqueue/protobuf/admin_pb2.py",
    "taskqueue/protobuf/admin_pb2.pyi",
    "taskqueue/protobuf/admin_grpc.py",
    "taskqueue/protobuf/admin_pb2_grpc.py",
    "taskqueue/protobuf/admin_pb2_grpc.pyi",
    "examples/cafe/cafe_pb2.py",
    "examples/cafe/cafe_pb2.pyi",
    "examples/cafe/cafe_grpc.py",
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location(
        "genproto", ROOT / "scripts" / "genproto.py"
    )
    assert spec is not None and spec.loader is not None
    genproto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(genproto)

    out_root = tmp_path_factory.mktemp("generated")
    genproto.generate(out_root)
    return out_root


def test_generation_makes_exactly_the_committed_files(generated: Path) -> None:
    made = sorted(
        str(path.relative_to(generated))
        for path in generated.rglob("*")
        if path.is_file()
    )

    assert made == sorted(COMMITTED)


@pytest.mark.parametrize("relative", COMMITTED)
def test_committed_file_is_byte_identical(generated: Path, relative: str) -> None:
    committed = (ROOT / relative).read_bytes()
    fresh = (generated / relative).read_bytes()

    assert committed == fresh, (
        f"{relative} differs from what scripts/genproto.py generates; "
        "run `python scripts/genproto.py` and do not reformat its output"
    )
