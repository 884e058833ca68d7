"""taskqueue: call a gRPC service back later, durably, through Apache Kafka.

``taskqueue.client`` is the tiny client library; ``taskqueue.server`` is the
service (rpc handler and workers); ``taskqueue.protobuf`` holds the protocol.
"""
