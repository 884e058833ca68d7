"""Server reflection: a client with no proto files lists, describes and calls add.

The client here does what grpcurl does: it asks the server for the file that
defines a service, then for that file's imports, builds the message classes
from the descriptors it got, and calls ``add`` with one of them.
"""

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpclib.client import Channel, Stream, UnaryUnaryMethod
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import (
    ServerReflectionRequest,
    ServerReflectionResponse,
)

from taskqueue.server.dispatcher import RawCodec
from taskqueue.server.topics import Topics
from tests.ops_support import METHOD, ops_config, rpc_with_metrics
from tests.support import read_topic

SERVICE = "taskqueue.service.TaskQueue"
AUTHORITY = "127.0.0.1:50999"  # never called: no worker runs here

Reflection = Stream[ServerReflectionRequest, ServerReflectionResponse]


async def ask(stream: Reflection, **request: Any) -> ServerReflectionResponse:
    await stream.send_message(ServerReflectionRequest(**request))
    reply = await stream.recv_message()
    assert reply is not None
    return reply


async def files_for(stream: Reflection, symbol: str) -> AsyncIterator[bytes]:
    """The file defining ``symbol`` and everything it imports, imports first."""
    reply = await ask(stream, file_containing_symbol=symbol)
    pending = list(reply.file_descriptor_response.file_descriptor_proto)
    seen: set[str] = set()
    ordered: list[bytes] = []
    while pending:
        raw = pending.pop()
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if proto.name in seen:
            continue
        seen.add(proto.name)
        ordered.insert(0, raw)
        for dependency in proto.dependency:
            found = await ask(stream, file_by_filename=dependency)
            pending.extend(found.file_descriptor_response.file_descriptor_proto)
    for raw in ordered:
        yield raw


async def test_reflection_lists_describes_and_calls_add(kafka_bootstrap: str) -> None:
    config = ops_config(kafka_bootstrap)
    pool = descriptor_pool.DescriptorPool()  # nothing known up front

    async with (
        rpc_with_metrics(config) as (port, _),
        Channel("127.0.0.1", port) as channel,
    ):
        async with ServerReflectionStub(channel).ServerReflectionInfo.open() as stream:
            listed = await ask(stream, list_services="")
            async for raw in files_for(stream, SERVICE):
                pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
            await stream.end()

        service = pool.FindServiceByName(SERVICE)
        add = service.FindMethodByName("add")
        # Classes made at run time: nothing for a type checker to know.
        task_class: Any = message_factory.GetMessageClass(add.input_type)
        reply_class: Any = message_factory.GetMessageClass(add.output_type)
        task = task_class(authority=AUTHORITY, method=METHOD)
        task.argument.type_url = "type.googleapis.com/coffeemachine.LatteOrder"

        async with Channel("127.0.0.1", port, codec=RawCodec()) as raw_channel:
            call = UnaryUnaryMethod[bytes, bytes](
                raw_channel, f"/{SERVICE}/add", bytes, bytes
            )
            body = await call(task.SerializeToString(), timeout=10)
        reply = reply_class.FromString(body)
        [record] = await read_topic(
            kafka_bootstrap, Topics(config.topics.prefix).main(AUTHORITY, "default"), 1
        )

    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert [m.name for m in service.methods] == ["add"]
    assert add.input_type.full_name == "taskqueue.service.Task"
    assert {f.name for f in add.input_type.fields} >= {
        "authority",
        "method",
        "argument",
    }
    assert record.key == reply.id.encode()
