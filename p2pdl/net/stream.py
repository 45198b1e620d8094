"""Frame streams: one plain TCP connection per link for large frames, read straight into reused buffers.

A link's WebSocket and ``POST /frames`` both pass every large frame through aiohttp's buffers:
the event loop copies each socket read into a new ``bytes``, the HTTP or WebSocket parser
copies it again, and the message is joined into a third ``bytes`` before the decoder sees it.
A frame stream removes those copies. The dialer of a link opens ``GET /stream`` with
``Upgrade: p2pdl-frames`` and the link's ``frames_token``; after ``101`` the connection carries
*records* both ways, each a u32 little-endian length followed by exactly one encoded frame
(docs/PROTOCOL.md section 5.1). The receiver is an :class:`asyncio.BufferedProtocol`: the kernel
writes each record's bytes directly into a buffer from a per-stream :class:`BufferPool`, and the
decoder views that buffer in place (``decode_frame(owned=True)``). A sender writes the length and
the frame with one ``writelines`` call, the frame either one ``bytes`` or the pieces of
:func:`~p2pdl.wire.encode.encode_frame_parts` (large tensors as views of their own memory, which
uvloop writes with one gathered ``writev`` and no copy), and returns once the bytes are in the
kernel (the write buffer limits are zero), so a caller may reuse its memory as soon as a send
returns.

Trade-offs:

* A buffer is reused only when nothing views it any more (its reference count is back to the
  pool's own), so a frame the strategy still holds is never overwritten; the price is that a
  frame kept alive forces a fresh allocation for the next record of that size.
* A record whose declared length is 0 or over ``max_frame_bytes`` is refused (counted) and the
  stream is closed: a byte stream cannot skip a record it will not read. The link's WebSocket
  stays up and large frames fall back to ``POST /frames`` and the WebSocket.
* A send of borrowed memory that is cancelled (or times out) before the kernel has all of it
  aborts the stream rather than let the rest go out after the caller's memory may have changed;
  the link then sends its large frames over ``POST /frames`` and the WebSocket until it redials.
* At most :data:`READY_RECORDS` complete records wait for the receive loop; past that the stream
  stops reading from the socket, so a fast sender is held back by TCP, not by this peer's memory.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import struct
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from p2pdl.errors import FrameError, FrameFormatError, FrameTooLargeError, TransportError

__all__ = [
    "READY_RECORDS",
    "RECORD_PREFIX",
    "STREAM_PATH",
    "UPGRADE",
    "BufferPool",
    "FrameStream",
    "open_stream",
]

STREAM_PATH: Final = "/stream"
UPGRADE: Final = "p2pdl-frames"
RECORD_PREFIX: Final[struct.Struct] = struct.Struct("<I")
READY_RECORDS: Final = 2  # complete records buffered before the stream stops reading
_MAX_RESPONSE_HEAD: Final = 4096  # bytes of the acceptor's 101 answer, headers included
_POOL_KEEP: Final = 4  # buffers a pool keeps for reuse
# sys.getrefcount of a pooled buffer that nothing else references: the pool's list, the loop
# variable and getrefcount's own argument.
_UNREFERENCED: Final = 3


class BufferPool:
    """Receive buffers, each reused once nothing views it (no frame, tensor or memoryview)."""

    def __init__(self, keep: int = _POOL_KEEP) -> None:
        self._keep = keep
        self._buffers: list[npt.NDArray[np.uint8]] = []
        self.allocations = 0  # buffers ever allocated: reuse keeps this flat across rounds

    def take(self, size: int) -> memoryview:
        """A writable buffer of exactly ``size`` bytes that nothing else references."""
        for buffer in self._buffers:
            if buffer.nbytes == size and sys.getrefcount(buffer) == _UNREFERENCED:
                return memoryview(buffer.data)
        fresh = np.empty(size, dtype=np.uint8)  # not zeroed: every byte is written by the socket
        self.allocations += 1
        self._buffers.append(fresh)
        if len(self._buffers) > self._keep:
            # Forget the oldest buffer (it is freed once its last view dies), never the new one.
            self._buffers.pop(0)
        return memoryview(fresh.data)


class FrameStream(asyncio.BufferedProtocol):
    """One end of a frame stream: records in (into pooled buffers) and out (zero-copy writes).

    ``max_record`` is the receiver's ``max_frame_bytes``; ``on_refused`` counts a record refused
    before it is read (declared length out of range). The dialer's end first reads the
    acceptor's ``101`` head (``expect_head=True``).
    """

    def __init__(self, *, max_record: int, on_refused: Callable[[FrameError], None], expect_head: bool = False) -> None:
        self._max_record = max_record
        self._on_refused = on_refused
        self.pool = BufferPool()
        self._transport: asyncio.Transport | None = None
        self._previous: asyncio.BaseProtocol | None = None
        self._head: bytearray | None = bytearray(_MAX_RESPONSE_HEAD) if expect_head else None
        self._head_filled = 0
        self.head_done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if not expect_head:
            self.head_done.set_result(b"")
        self._prefix = bytearray(RECORD_PREFIX.size)
        self._target: memoryview = memoryview(self._prefix)
        self._filled = 0
        self._in_body = False
        self._ready: collections.deque[memoryview] = collections.deque()
        self._arrival = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False
        self.closed = asyncio.Event()
        self.drained = asyncio.Event()  # closed, and every record received was handed to the reader
        self.records_received = 0
        self.records_sent = 0

    # ------------------------------------------------------------------ wiring

    def attach(self, transport: asyncio.Transport, previous: asyncio.BaseProtocol | None = None) -> None:
        """Take over ``transport`` (the acceptor's upgraded connection); ``previous`` is told when it ends."""
        self._previous = previous
        transport.set_protocol(self)
        self.connection_made(transport)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = typing.cast(asyncio.Transport, transport)
        # Zero limits: pause_writing as soon as anything is buffered, resume when all of it is in
        # the kernel, so a finished send means the caller's memory is no longer referenced.
        self._transport.set_write_buffer_limits(high=0, low=0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self._writable.set()
        self._arrival.set()
        if not self.head_done.done():
            self.head_done.set_exception(ConnectionResetError("frame stream closed during its handshake"))
        if self._previous is not None:
            previous, self._previous = self._previous, None
            previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection and anything still unsent (after a send timed out)."""
        if self._transport is not None:
            self._transport.abort()

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self.closed.is_set() and self.head_done.done()

    # ------------------------------------------------------------------ receiving

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._head is not None:
            return memoryview(self._head)[self._head_filled :]
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._head is not None:
            self._head_filled += nbytes
            self._read_head()
            return
        self._filled += nbytes
        if self._filled == self._target.nbytes:
            self._complete()

    def _read_head(self) -> None:
        assert self._head is not None
        head = bytes(self._head[: self._head_filled])
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if self._head_filled == len(self._head):
                self._fail_head("the answer to GET /stream has no end of headers within 4 KiB")
            return
        self._head = None
        self.head_done.set_result(head[: end + 4])
        self._feed(head[end + 4 :])

    def _fail_head(self, reason: str) -> None:
        if not self.head_done.done():
            self.head_done.set_exception(TransportError(reason))
        self.close()

    def _feed(self, data: bytes) -> None:
        """Bytes that arrived with the head: copy them in as if the socket had delivered them."""
        offset = 0
        while offset < len(data) and not self.closed.is_set():
            target = self.get_buffer(len(data) - offset)
            count = min(target.nbytes, len(data) - offset)
            target[:count] = data[offset : offset + count]
            offset += count
            self.buffer_updated(count)

    def _complete(self) -> None:
        if not self._in_body:
            (length,) = RECORD_PREFIX.unpack(self._prefix)
            if not 0 < length <= self._max_record:
                error: FrameError = (
                    FrameFormatError("a frame stream record of 0 bytes")
                    if length == 0
                    else FrameTooLargeError(f"frame is {length} bytes; max_frame_bytes is {self._max_record}")
                )
                self._on_refused(error)
                self.close()
                self._target, self._filled = memoryview(self._prefix), 0
                return
            self._target, self._filled, self._in_body = self.pool.take(length), 0, True
            return
        self._ready.append(self._target)
        self.records_received += 1
        self._arrival.set()
        self._target, self._filled, self._in_body = memoryview(self._prefix), 0, False
        if len(self._ready) >= READY_RECORDS and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    async def next_record(self) -> memoryview | None:
        """The next complete record (a frame's bytes, owned by the caller), or None once closed."""
        while not self._ready:
            if self.closed.is_set():
                self.drained.set()
                return None
            self._arrival.clear()
            await self._arrival.wait()
        record = self._ready.popleft()
        if self._reading_paused and self._transport is not None and not self.closed.is_set():
            self._reading_paused = False
            self._transport.resume_reading()
        return record

    # ------------------------------------------------------------------ sending

    async def send(self, record: bytes | memoryview | Sequence[bytes | memoryview], *, borrowed: bool = False) -> None:
        """Write one record (one buffer, or pieces whose concatenation is the frame); returns once
        every byte is in the kernel (ConnectionError if closed).

        ``borrowed``: the pieces view memory that the caller may change as soon as this returns
        (a tensor sent in place). The transport writes them with one gathered write and no copy,
        and holds them until the kernel has every byte. If this call is cancelled or times out
        while some of them are still queued, the stream is aborted: a record that could not go out
        before the caller's memory may change never goes out at all (the receiver sees the stream
        close, never a record with changed bytes).
        """
        transport = self._transport
        if transport is None or self.closed.is_set() or transport.is_closing():
            raise ConnectionResetError("frame stream is closed")
        pieces = [record] if isinstance(record, bytes | memoryview) else list(record)
        nbytes = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)
        transport.writelines([RECORD_PREFIX.pack(nbytes), *pieces])
        self.records_sent += 1
        try:
            while transport.get_write_buffer_size() > 0:
                if self.closed.is_set():
                    raise ConnectionResetError("frame stream closed before the record was sent")
                self._writable.clear()
                if transport.get_write_buffer_size() == 0:
                    break
                await self._writable.wait()
        except asyncio.CancelledError:
            if borrowed and transport.get_write_buffer_size() > 0:
                transport.abort()
            raise


def upgrade_request(host: str, headers: Mapping[str, str]) -> bytes:
    """The dialer's ``GET /stream`` head (docs/PROTOCOL.md section 5.1)."""
    lines = [
        f"GET {STREAM_PATH} HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        f"Upgrade: {UPGRADE}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError("a header of GET /stream contains a line break")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def open_stream(
    address: str,
    headers: Mapping[str, str],
    *,
    ssl: ssl.SSLContext | None,
    max_record: int,
    on_refused: Callable[[FrameError], None],
    timeout: float,
) -> FrameStream:
    """Dial ``address`` (``host:port``), upgrade to a frame stream; TransportError or OSError on failure."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    stream: FrameStream | None = None

    def factory() -> FrameStream:
        nonlocal stream
        stream = FrameStream(max_record=max_record, on_refused=on_refused, expect_head=True)
        return stream

    async with asyncio.timeout(timeout):
        transport, _ = await loop.create_connection(
            factory,
            host.strip("[]"),
            int(port),
            ssl=ssl,
        )
        assert stream is not None
        try:
            transport.write(upgrade_request(address, headers))
            head = await stream.head_done
        except BaseException:
            transport.abort()
            raise
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or status[0] != b"HTTP/1.1" or status[1] != b"101":
        transport.abort()
        raise TransportError(f"{address} refused GET {STREAM_PATH}: {head.splitlines()[0]!r:.80}")
    return stream
