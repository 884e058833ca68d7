"""The tiny client: enqueue calls of your own service's methods.

Depends only on grpclib and protobuf; nothing from ``taskqueue.server``.
"""

from taskqueue.client.queue import QueueStub, TaskMethod
from taskqueue.protobuf.service_pb2 import RetryPolicy

__all__ = ["QueueStub", "RetryPolicy", "TaskMethod"]
