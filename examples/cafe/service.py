"""The coffee machine: a gRPC service that taskqueue calls back.

python examples/cafe/service.py --port 50061
"""

import argparse
import asyncio
import contextlib
import logging

import cafe_grpc
import cafe_pb2
from google.protobuf.empty_pb2 import Empty
from grpclib.server import Server, Stream

log = logging.getLogger("cafe")


class CoffeeMachine(cafe_grpc.CoffeeMachineBase):
    async def make_latte(self, stream: Stream[cafe_pb2.LatteOrder, Empty]) -> None:
        order = await stream.recv_message()
        assert order is not None  # grpclib gives None only to streaming methods
        metadata = dict(stream.metadata or {})
        log.info(
            "received order: %s latte at %d degrees, %d sugar (task %s, attempt %s)",
            cafe_pb2.Size.Name(order.size).lower(),
            order.temperature,
            order.sugar,
            metadata.get("taskqueue-task-id"),
            metadata.get("taskqueue-attempt"),
        )
        await stream.send_message(Empty())


async def serve(host: str, port: int) -> None:
    server = Server([CoffeeMachine()])
    await server.start(host, port)
    log.info("coffee machine listening on %s:%d", host, port)
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
