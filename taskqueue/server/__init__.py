"""taskqueue's service: the rpc handler and the workers (``taskqueue[server]``)."""

from taskqueue.server import kafka_batches

# Here, not where each consumer is made, so that every consumer of the server
# (workers, `taskqueue dlq`, `taskqueue queues`, the pause board) reads a
# record whose header name is not UTF-8 instead of stopping on it.
kafka_batches.install()
