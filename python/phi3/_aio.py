"""asyncio over phi3's streams: ``Phi3.astream``, ``Phi3.agenerate`` and their ``Chat`` twins.

A ``Stream`` waits for its next piece with the GIL released. Here that wait happens in a worker
thread, so the event loop never blocks; the engine's scheduler keeps batching every stream
meanwhile. Cancelling the awaiting task ends the generation as soon as the read in flight
returns (at the next token).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Union

from phi3._core import Stats, Stream, Token

# Each waiting stream holds a thread (asleep, GIL released), so the pool is larger than the
# default executor's: streams beyond it wait for a thread, never for each other's answers.
_WORKERS = 64
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="phi3-stream")

_DONE = object()


class AsyncStream:
    """An answer being generated, for ``async for``: ``str`` pieces (``Token`` with
    ``details=True``). ``stats`` and ``text`` are those of the underlying ``Stream``."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        # A stream cannot be closed while a worker reads it, so whoever comes last closes it:
        # close_soon() if no read is in flight, else the reader as its read returns. That needs
        # no event loop, so it also happens when the loop is gone.
        self._lock = threading.Lock()
        self._reading = False
        self._closing = False

    def __aiter__(self) -> AsyncStream:
        return self

    def _read(self) -> object:
        piece = next(self._stream, _DONE)
        with self._lock:
            self._reading = False
            if self._closing:
                self._stream.close()
        return piece

    async def __anext__(self) -> Union[str, Token]:
        with self._lock:
            if self._closing:
                raise StopAsyncIteration
            self._reading = True
        read = asyncio.get_running_loop().run_in_executor(_pool, self._read)
        try:
            # Shielded: cancelling the task must not cancel a read not yet started, which would
            # then never run, never see `_closing`, and leave the stream open.
            piece = await asyncio.shield(read)
        except asyncio.CancelledError:
            self.close_soon()
            raise
        if piece is _DONE:
            raise StopAsyncIteration
        assert isinstance(piece, (str, Token))
        return piece

    @property
    def stats(self) -> Stats:
        return self._stream.stats

    @property
    def text(self) -> str:
        return self._stream.text

    def close_soon(self) -> None:
        """Ends the generation without waiting: now in a worker, or as the read in flight returns."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._reading:
                return
        _pool.submit(self._stream.close)

    async def aclose(self) -> None:
        """Ends the generation now and frees its place in the batch."""
        with self._lock:
            closed_here = not (self._closing or self._reading)
            self._closing = True
        if closed_here:
            await asyncio.get_running_loop().run_in_executor(_pool, self._stream.close)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


async def collect(stream: Stream) -> str:
    """The whole answer of ``stream``; cancelling the task ends the generation."""
    async with AsyncStream(stream) as pieces:
        async for _ in pieces:
            pass
        return pieces.text
