"""The inference worker's wire format: framed messages on a Unix socket pair, pixels and results in shared memory.

Every message is a 5-byte header (kind, body length) and its body. Start-up speaks JSON (the configuration, the
worker's progress, its description of the loaded models); the per-batch messages are fixed-format ``struct``
records, and the pixels and results never travel on the socket at all: the worker creates one shared-memory file
(``memfd``) sized for the largest batch, and passes its descriptor to the server with its READY message
(``SCM_RIGHTS``). Nothing is ever pickled.

Shared memory holds, for the one batch in flight: the input region (``n`` images of uint8 ``(H, W, C)`` pixels)
at offset 0, and the output region (float32 scores ``(n, classes)``, float32 ``(n, 2)`` familiarity (the flag as
1/0 and the value; NaN without a detector), then each attention module's uint8 masks ``(n, h, w)`` in network
order) at :attr:`Layout.output_offset`.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

HEADER = struct.Struct("<BI")  # kind, body length
RUN = struct.Struct("<HIB")  # model index, images, attention (0/1)
RESULT = struct.Struct("<IQQQ")  # images, forward nanoseconds, CUDA bytes allocated, CUDA bytes reserved
FAILURE = struct.Struct("<B")  # 1: out of memory, 0: anything else; the body goes on with the message (UTF-8)
ALIGN = 64
RELAYED_METRICS = ("model_compiled", "compile_failures_total", "compile_speedup_ratio")  # what an EVENT may set
MAX_JSON_BYTES = 64 << 20  # a start-up message larger than this is a broken peer


class Kind(IntEnum):
    CONFIG = 1  # server -> worker: JSON, the first message
    STATUS = 2  # worker -> server: JSON {"state": "loading" | "warming up", "model": name}
    READY = 3  # worker -> server: JSON (models and layout), with the shared-memory descriptor
    START_FAILED = 4  # worker -> server: UTF-8, why it cannot serve; it exits next
    RUN = 5  # server -> worker: RUN record; the pixels are in shared memory
    RESULT = 6  # worker -> server: RESULT record; the results are in shared memory
    FAILED = 7  # worker -> server: FAILURE record + UTF-8 message; this batch failed, the worker goes on
    STOP = 8  # server -> worker: exit now
    EVENT = 9  # worker -> server: JSON {"metric", "labels", "op", "value"}, a compile metric (any time)


class PeerGone(ConnectionError):
    """The other end closed the socket (exited, crashed or was killed)."""


def send(sock: socket.socket, kind: Kind, body: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    data = HEADER.pack(kind, len(body)) + body
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def send_json(sock: socket.socket, kind: Kind, value: Any, fds: tuple[int, ...] = ()) -> None:
    send(sock, kind, json.dumps(value).encode(), fds)


def receive(sock: socket.socket, *, with_fds: bool = False,
            alive: Callable[[], bool] | None = None) -> tuple[Kind, bytes, list[int]]:
    """The next message: (kind, body, descriptors passed with it). Raises :class:`PeerGone` at the end of the
    stream. On a socket with a timeout, each time it runs out ``alive()`` says whether to go on waiting."""
    fds: list[int] = []
    if with_fds:
        while True:
            try:
                head, fds, _, _ = socket.recv_fds(sock, HEADER.size, 1)
                break
            except TimeoutError:
                _check(alive)
        if not head:
            raise PeerGone("the peer closed the connection")
        head += _read_exactly(sock, HEADER.size - len(head), alive)
    else:
        head = _read_exactly(sock, HEADER.size, alive)
    kind, length = HEADER.unpack(head)
    return Kind(kind), _read_exactly(sock, length, alive), list(fds)


def receive_json(body: bytes) -> Any:
    if len(body) > MAX_JSON_BYTES:
        raise ValueError(f"start-up message of {len(body)} bytes")
    return json.loads(body)


def _read_exactly(sock: socket.socket, size: int, alive: Callable[[], bool] | None = None) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            _check(alive)
            continue
        if n == 0:
            raise PeerGone("the peer closed the connection")
        got += n
    return bytes(buf)


def _check(alive: Callable[[], bool] | None) -> None:
    if alive is not None and not alive():
        raise PeerGone("the peer exited")


@dataclass(frozen=True)
class ModelLayout:
    """Where one model's batch lives in shared memory."""

    input_shape: tuple[int, int, int]  # (H, W, C) of one image
    classes: int
    masks: tuple[tuple[str, int, int], ...]  # (module, h, w) in network order

    @property
    def input_bytes(self) -> int:
        h, w, c = self.input_shape
        return h * w * c

    @property
    def output_bytes(self) -> int:
        return self.classes * 4 + 2 * 4 + sum(h * w for _, h, w in self.masks)


@dataclass(frozen=True)
class Layout:
    """The shared-memory layout for every served model, for batches of up to ``max_batch`` images."""

    max_batch: int
    models: dict[str, ModelLayout]

    @property
    def output_offset(self) -> int:
        return _aligned(self.max_batch * max(m.input_bytes for m in self.models.values()))

    @property
    def size(self) -> int:
        return self.output_offset + _aligned(self.max_batch * max(m.output_bytes for m in self.models.values()))

    def to_json(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch,
                "models": {name: {"input_shape": list(m.input_shape), "classes": m.classes,
                                  "masks": [list(mask) for mask in m.masks]} for name, m in self.models.items()}}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Layout:
        models = {name: ModelLayout(tuple(m["input_shape"]), int(m["classes"]),
                                    tuple((str(a), int(h), int(w)) for a, h, w in m["masks"]))
                  for name, m in value["models"].items()}
        return cls(int(value["max_batch"]), models)

    def inputs(self, buffer: mmap.mmap, model: str, n: int) -> np.ndarray:
        """The uint8 ``(n, H, W, C)`` input view of ``model``'s batch."""
        m = self._batch(model, n)
        return np.frombuffer(buffer, np.uint8, n * m.input_bytes, 0).reshape(n, *m.input_shape)

    def scores(self, buffer: mmap.mmap, model: str, n: int) -> np.ndarray:
        """The float32 ``(n, classes)`` score view."""
        m = self._batch(model, n)
        return np.frombuffer(buffer, np.float32, n * m.classes, self.output_offset).reshape(n, m.classes)

    def familiarity(self, buffer: mmap.mmap, model: str, n: int) -> np.ndarray:
        """The float32 ``(n, 2)`` view: (familiar flag, familiarity), NaN where the model has no detector."""
        m = self._batch(model, n)
        return np.frombuffer(buffer, np.float32, n * 2, self.output_offset + n * m.classes * 4).reshape(n, 2)

    def masks(self, buffer: mmap.mmap, model: str, n: int) -> dict[str, np.ndarray]:
        """Module -> the uint8 ``(n, h, w)`` mask view, in network order."""
        m = self._batch(model, n)
        offset, out = self.output_offset + n * (m.classes * 4 + 2 * 4), {}
        for module, h, w in m.masks:
            out[module] = np.frombuffer(buffer, np.uint8, n * h * w, offset).reshape(n, h, w)
            offset += n * h * w
        return out

    def _batch(self, model: str, n: int) -> ModelLayout:
        if not 0 < n <= self.max_batch:
            raise ValueError(f"batch of {n} images; shared memory holds 1 to {self.max_batch}")
        return self.models[model]


def _aligned(size: int) -> int:
    return max(ALIGN, -(-size // ALIGN) * ALIGN)


def shared_memory(size: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared-memory file of ``size`` bytes (``memfd`` where the OS has it, else an unlinked
    temporary file) and a read-write mapping of it: (descriptor, mapping)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("macula-batch", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS and other systems without memfd
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)
