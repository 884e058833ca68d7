"""A task's argument (a ``google.protobuf.Any``) decoded for people to read.

Workers never need the argument's type; an operator looking at dead letters
does. The types come from a FileDescriptorSet the operator passes, as written by
``protoc --descriptor_set_out=FILE --include_imports``. Protobuf's well-known
types are taken from the runtime when the set lacks them, so a set made
without ``--include_imports`` works as long as it imports nothing else.
"""

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any as JsonValue

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.any_pb2 import Any
from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet
from google.protobuf.message import DecodeError

from taskqueue.server.errors import BadArgument


@dataclass(frozen=True, slots=True)
class Decoded:
    """An argument as shown: its JSON form when the type is known, else bytes."""

    type_url: str
    value: bytes
    json: dict[str, JsonValue] | None = None
    # Why there is no JSON form, when the type was known but did not decode.
    problem: str | None = None


class ArgumentTypes:
    """Message types that arguments can be decoded with; empty by default."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool

    @classmethod
    def load(cls, path: Path) -> "ArgumentTypes":
        try:
            files = FileDescriptorSet.FromString(path.read_bytes()).file
        except OSError as exc:
            raise BadArgument(f"cannot read {path}: {exc.strerror}") from None
        except DecodeError:
            raise BadArgument(
                f"{path} is not a FileDescriptorSet (protoc --descriptor_set_out)"
            ) from None
        pool = descriptor_pool.DescriptorPool()
        for file in _in_dependency_order(path, list(files)):
            pool.Add(file)
        return cls(pool)

    def decode(self, argument: Any) -> Decoded:
        raw = Decoded(argument.type_url, argument.value)
        if self._pool is None:
            return raw
        name = argument.type_url.rpartition("/")[2]
        try:
            descriptor = self._pool.FindMessageTypeByName(name)
        except KeyError:
            return raw

        message = message_factory.GetMessageClass(descriptor)()
        try:
            message.ParseFromString(argument.value)
            as_json = json_format.MessageToDict(
                message, preserving_proto_field_name=True, descriptor_pool=self._pool
            )
        except (DecodeError, TypeError, KeyError, ValueError) as exc:
            # TypeError/KeyError: a nested Any whose type the set lacks.
            problem = f"does not decode as {name}: {exc}"
            return Decoded(argument.type_url, argument.value, problem=problem)
        return Decoded(argument.type_url, argument.value, json=as_json)


def _in_dependency_order(
    path: Path, files: list[FileDescriptorProto]
) -> list[FileDescriptorProto]:
    """Files after their imports: a descriptor pool builds each file as added."""
    by_name = {file.name: file for file in files}
    ordered: list[FileDescriptorProto] = []
    done: set[str] = set()

    def visit(name: str, importer: str) -> None:
        if name in done:
            return
        done.add(name)
        file = by_name.get(name) or _well_known(name)
        if file is None:
            raise BadArgument(
                f"{path}: {importer} imports {name}, which the set lacks "
                "(make it with protoc --include_imports)"
            )
        for dependency in file.dependency:
            visit(dependency, name)
        ordered.append(file)

    for file in files:
        visit(file.name, file.name)
    return ordered


def _well_known(name: str) -> FileDescriptorProto | None:
    if not name.startswith("google/protobuf/"):
        return None
    # Importing a well-known type's module registers its file in the default pool.
    module = name.removesuffix(".proto").replace("/", ".") + "_pb2"
    try:
        importlib.import_module(module)
        found = descriptor_pool.Default().FindFileByName(name)
    except (ImportError, KeyError):
        return None
    proto = FileDescriptorProto()
    found.CopyToProto(proto)
    return proto
