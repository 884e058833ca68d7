"""``taskqueue.admin.Admin``: operators pause and resume calls over gRPC.

Served by the rpc server when ``admin.enabled`` is set. A pause or resume is
answered once the rpc server has read it back from the control topic, so a
``list_pauses`` right after it sees it; workers apply it as soon as they read
it (see ``control.py``).
"""

import logging

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from taskqueue.protobuf.admin_grpc import AdminBase
from taskqueue.protobuf.admin_pb2 import (
    ListPausesRequest,
    Pause,
    PauseRequest,
    Pauses,
    ResumeReply,
    ResumeRequest,
)
from taskqueue.server import control, validation
from taskqueue.server.config import Config
from taskqueue.server.errors import TaskQueueError
from taskqueue.server.topics import Topics

log = logging.getLogger(__name__)


class AdminService(AdminBase):
    def __init__(
        self,
        config: Config,
        board: control.PauseBoard,
        writer: control.PauseWriter,
    ) -> None:
        self._config = config
        self._board = board
        self._writer = writer
        self._topics = Topics(config.topics.prefix)

    async def pause(self, stream: "Stream[PauseRequest, Pause]") -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no PauseRequest")
        self._check(request.authority, request.queue)
        try:
            pause, offset = await self._writer.pause(
                request.authority, request.queue, request.reason
            )
            await self._board.reached(offset, self._config.kafka.request_timeout_s)
        except (TaskQueueError, TimeoutError) as exc:
            raise GRPCError(Status.UNAVAILABLE, f"pause not confirmed: {exc}") from None
        log.info("pause of %s requested", pause.key)
        await stream.send_message(_to_proto(pause))

    async def resume(self, stream: "Stream[ResumeRequest, ResumeReply]") -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no ResumeRequest")
        self._check(request.authority, request.queue)
        key = control.pause_key(control.normalise(request.authority), request.queue)
        was_paused = any(p.key == key for p in self._board.pauses())
        try:
            offset = await self._writer.resume(request.authority, request.queue)
            await self._board.reached(offset, self._config.kafka.request_timeout_s)
        except (TaskQueueError, TimeoutError) as exc:
            raise GRPCError(
                Status.UNAVAILABLE, f"resume not confirmed: {exc}"
            ) from None
        log.info("resume of %s requested", key)
        await stream.send_message(ResumeReply(was_paused=was_paused))

    async def list_pauses(self, stream: "Stream[ListPausesRequest, Pauses]") -> None:
        await stream.recv_message()
        pauses = [_to_proto(p) for p in self._board.pauses()]
        await stream.send_message(Pauses(pauses=pauses))

    def _check(self, authority: str, queue: str) -> None:
        try:
            validation.check_authority(authority)
            if queue:
                topic = self._topics.main(authority, queue)
                validation.check_queue(queue, len(topic))
        except TaskQueueError as exc:
            raise GRPCError(exc.status, str(exc)) from None


def _to_proto(pause: control.Pause) -> Pause:
    reply = Pause(authority=pause.authority, queue=pause.queue, reason=pause.reason)
    reply.since.FromMilliseconds(pause.since_ms)
    return reply
