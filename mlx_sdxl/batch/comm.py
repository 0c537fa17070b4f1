"""Messages between the ranks of a batch, over an `mx.distributed` group.

A message is a kind, a JSON object and a list of arrays (latents, conditioning, an image's
pixels). On the wire it is an int64 length, the JSON as uint8, then each array as the
JSON describes it (shape, dtype), each moved by `mx.distributed.send` / `recv`, so any
backend MLX runs (ring, MPI) carries it and arrays arrive bit for bit.

Each `Link` to a peer sends from one background thread and receives in another, so the
main thread keeps computing (rank 0 hands out work while it makes images) and stays
responsive to Ctrl-C and SIGTERM: it only ever waits on a queue, with a short timeout.
A link that listens `always` has a receive pending all the time (rank 0, which must hear
whichever rank is free first); otherwise one receive is posted per `want()`, because
MLX's ring backend polls its socket while a receive is pending, which costs a CPU core.

When a peer's process ends, its sockets close and the pending receive fails: the link
puts `PeerLost` in the inbox, and the rank stops cleanly. The ring backend links each
rank only to its two neighbours, so over it a batch can use up to 3 ranks (rank 0 and
its two neighbours); the MPI backend links every pair.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

MAX_META_BYTES = 64 << 20
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_IBV_DEVICES")


@dataclass
class Message:
    kind: str
    sender: int
    meta: dict = field(default_factory=dict)
    arrays: List[object] = field(default_factory=list)


class PeerLost(Exception):
    """A peer stopped answering: its process ended, or a send or receive to it failed."""

    def __init__(self, rank: int, reason: str):
        hint = ""
        if "only supported" in reason:  # the ring backend: not a neighbour
            hint = "; the ring backend links each rank only to its neighbours: use at most 3 ranks, or --backend mpi"
        super().__init__(f"rank {rank}: {reason}{hint}")
        self.rank = rank


def world():
    """The distributed group: the launched ranks (mlx.launch, mpirun), or this process alone."""
    import mlx.core as mx

    launched = any(name in os.environ for name in LAUNCH_ENV)
    return mx.distributed.init(strict=launched)


def _dtype(name: str):
    import mlx.core as mx

    dtype = getattr(mx, name.rsplit(".", 1)[-1], None)
    if not isinstance(dtype, mx.Dtype):
        raise ValueError(f"unknown dtype {name!r} in a message")
    return dtype


class Link:
    """Messages to and from one peer; what arrives goes to `inbox` (shared by several links)."""

    def __init__(self, group, peer: int, inbox: queue.Queue, always: bool = False):
        self.group, self.peer, self.inbox, self.always = group, peer, inbox, always
        self._outbox: queue.Queue = queue.Queue()
        self._wanted = threading.Semaphore(0)
        self._dead = False
        for target, name in ((self._send_loop, "send"), (self._recv_loop, "recv")):
            threading.Thread(target=target, name=f"batch-{name}-{peer}", daemon=True).start()

    # ---------------------------------------------------------------- the caller's side
    def send(self, kind: str, meta: Optional[dict] = None, arrays: Sequence = ()) -> None:
        """Queue a message (returns at once); its arrays are evaluated here first."""
        import mlx.core as mx

        arrays = [a for a in arrays]
        mx.eval(arrays)
        self._outbox.put((kind, dict(meta or {}), arrays))

    def want(self) -> None:
        """Post one receive (links that do not listen `always`)."""
        self._wanted.release()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued message is sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._outbox.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._outbox.unfinished_tasks

    # ---------------------------------------------------------------- the threads
    def _send_loop(self) -> None:
        while True:
            kind, meta, arrays = self._outbox.get()
            try:
                if not self._dead:
                    self._send_frames(kind, meta, arrays)
            except Exception as e:  # the peer is gone, or the backend refuses the pair
                self._dead = True
                self.inbox.put(PeerLost(self.peer, str(e)))
            finally:
                self._outbox.task_done()

    def _send_frames(self, kind: str, meta: dict, arrays: List) -> None:
        import mlx.core as mx

        meta = dict(meta, kind=kind, arrays=[[list(a.shape), str(a.dtype)] for a in arrays])
        data = json.dumps(meta).encode()
        frames = [mx.array([len(data)], dtype=mx.int64), mx.array(np.frombuffer(data, dtype=np.uint8)), *arrays]
        for frame in frames:
            mx.eval(mx.distributed.send(frame, self.peer, group=self.group))

    def _recv_loop(self) -> None:
        try:
            while True:
                if not self.always:
                    self._wanted.acquire()
                message = self._receive()
                self.inbox.put(message)
                if message.kind == "bye":
                    return
        except Exception as e:
            self._dead = True
            self.inbox.put(PeerLost(self.peer, str(e)))

    def _receive(self) -> Message:
        import mlx.core as mx

        def recv(shape, dtype):
            a = mx.distributed.recv(tuple(shape), dtype, self.peer, group=self.group)
            mx.eval(a)
            return a

        size = int(recv((1,), mx.int64).item())
        if not 0 < size <= MAX_META_BYTES:
            raise ValueError(f"a message of {size} bytes of JSON")
        meta = json.loads(bytes(np.array(recv((size,), mx.uint8))))
        arrays = [recv(shape, _dtype(dtype)) for shape, dtype in meta.pop("arrays")]
        return Message(meta.pop("kind"), self.peer, meta, arrays)


def receive(inbox: queue.Queue, poll: float = 0.2) -> Message:
    """The next message (raising PeerLost when a link failed), waiting in short slices so that
    signals are handled."""
    while True:
        try:
            item = inbox.get(timeout=poll)
        except queue.Empty:
            continue
        if isinstance(item, PeerLost):
            raise item
        return item
