"""Order lattes through taskqueue: the coffee machine is called back later.

python examples/cafe/enqueue.py --count 3 --delay 2
"""

import argparse
import asyncio
import logging

import cafe_pb2
from grpclib.client import Channel

from taskqueue.client.queue import QueueStub

log = logging.getLogger("cafe.client")

CoffeeMachineQueue = QueueStub.for_(cafe_pb2, "CoffeeMachine")


async def order(args: argparse.Namespace) -> None:
    host, _, port = args.taskqueue.rpartition(":")
    async with Channel(host, int(port)) as channel:
        queue = CoffeeMachineQueue(args.cafe, channel)
        for number in range(args.count):
            latte = cafe_pb2.LatteOrder(
                size=cafe_pb2.SMALL, temperature=90, sugar=number % 4
            )
            task_id = await queue.make_latte.add(
                latte, queue="default", delay=args.delay, timeout=10
            )
            log.info("enqueued order %d as task %s", number + 1, task_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--taskqueue", default="127.0.0.1:50051")
    parser.add_argument(
        "--cafe", default="127.0.0.1:50061", help="where taskqueue calls"
    )
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(order(args))


if __name__ == "__main__":
    main()
