"""The tiny client: enqueue calls of your own service's methods.

Depends only on grpclib and protobuf; nothing from ``taskqueue.server``.
"""

from taskqueue.client.queue import QueueStub, TaskMethod

__all__ = ["QueueStub", "TaskMethod"]
