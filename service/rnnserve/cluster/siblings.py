"""Sessions follow their calls between the worker processes of one server.

The kernel spreads connections over the workers (SO_REUSEPORT), not sessions: a client that
reconnects, or a proxy that opens a second connection, may reach a worker that does not hold the
session. That worker asks its siblings, over their unix sockets (gRPC, the same stack as
everything else), to release it: the holder finishes the session's in-flight steps under its
lock, lets it go and sends its state; the asker restores it in the same event-loop turn as the
answer arrives. A session is live in exactly one worker at every moment; one the asker cannot
hold goes back to where it came from.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np

from rnnserve.engine.sources import MOVE_CALL_TIMEOUT, ParkedSession
from rnnserve.generated.rnnserve.internal.v1 import siblings_pb2 as pb
from rnnserve.generated.rnnserve.internal.v1 import siblings_pb2_grpc as rpc
from rnnserve.ops.logs import Throttled

unanswered = Throttled(__name__)
"""A dead or restarting worker: one line per worker a minute, not one per lookup (a client
retrying its lost sessions made 1,188 lines in 12 s)."""
SIBLING_KEY_HEADER = "x-rnnserve-sibling-key"


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


def to_message(parked: ParkedSession) -> pb.MovedSession:
    return pb.MovedSession(
        session_id=parked.session_id,
        owner=parked.owner,
        model=parked.model,
        version=parked.version,
        steps=parked.steps,
        idle_seconds=parked.idle_seconds,
        states={k: np.ascontiguousarray(v, "<f4").tobytes() for k, v in parked.states.items()},
    )


def from_message(moved: pb.MovedSession) -> ParkedSession:
    return ParkedSession(
        moved.session_id,
        moved.owner,
        moved.model,
        moved.version,
        moved.steps,
        moved.idle_seconds,
        {k: np.frombuffer(v, "<f4").copy() for k, v in moved.states.items()},
    )


class SiblingsServicer(rpc.SiblingsServicer):
    """This worker's side: hands its sessions to a sibling that got a call for them."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        moved, ended, moving = await self.engine.moves.release_sessions(
            list(request.session_ids), request.owner
        )
        return pb.ReleaseResponse(
            sessions=[to_message(p) for p in moved], ended=ended, moving=moving
        )

    async def Restore(
        self, request: pb.RestoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.RestoreResponse:
        lost = self.engine.moves.take_back([from_message(m) for m in request.sessions])
        return pb.RestoreResponse(lost=lost)


class Siblings:
    """The other workers of this server, reached over their unix sockets."""

    def __init__(self, run_dir: Path, index: int, count: int, key: str) -> None:
        self.paths = {i: socket_path(run_dir, i) for i in range(count) if i != index}
        self.metadata = ((SIBLING_KEY_HEADER, key),)
        self._stubs: dict[int, rpc.SiblingsStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, index: int) -> rpc.SiblingsStub:
        stub = self._stubs.get(index)
        if stub is None:
            channel = grpc.aio.insecure_channel(f"unix:{self.paths[index]}")
            self._channels.append(channel)
            stub = self._stubs[index] = rpc.SiblingsStub(channel)
        return stub

    async def take(
        self, session_ids: list[str], owner: str
    ) -> tuple[dict[str, tuple[int, ParkedSession]], dict[str, str], set[str]]:
        """Ask every sibling at once: the sessions released (with the worker each came from),
        the ids a sibling ended recently (with why), and those live but not free to move
        now (busy, or on their way between two other workers)."""
        indexes = list(self.paths)
        request = pb.ReleaseRequest(session_ids=session_ids, owner=owner)
        answers = await asyncio.gather(
            *(
                self._stub(i).Release(request, timeout=MOVE_CALL_TIMEOUT, metadata=self.metadata)
                for i in indexes
            ),
            return_exceptions=True,
        )
        moved: dict[str, tuple[int, ParkedSession]] = {}
        ended: dict[str, str] = {}
        moving: set[str] = set()
        for index, answer in zip(indexes, answers):
            if isinstance(answer, BaseException):
                if not isinstance(answer, grpc.RpcError):
                    raise answer
                unanswered.warning(
                    f"sibling-{index}",
                    "worker %d did not answer a session "
                    "lookup (%s): sessions it held cannot be reached now",
                    index,
                    answer.code().name,
                )
                continue
            for message in answer.sessions:
                moved[message.session_id] = (index, from_message(message))
            ended.update(answer.ended)
            moving.update(answer.moving)
        return moved, ended, moving - moved.keys()

    async def give_back(self, index: int, sessions: list[ParkedSession]) -> list[str]:
        """Return sessions to the worker they came from; the ids lost on the way."""
        try:
            answer = await self._stub(index).Restore(
                pb.RestoreRequest(sessions=[to_message(p) for p in sessions]),
                timeout=MOVE_CALL_TIMEOUT,
                metadata=self.metadata,
            )
        except grpc.RpcError:
            return [p.session_id for p in sessions]
        return list(answer.lost)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
