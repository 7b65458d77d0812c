"""Reading ahead and writing behind the merge: reused read buffers, loader threads that
keep the next tensors coming, and one writer thread that takes each merged tensor in order.

torch and file I/O release the GIL, so with `threads` > 0 the three stages overlap.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import torch

T = TypeVar("T")


class ReadBuffers:
    """Memory for the raw reads, reused from tensor to tensor.

    Each of `sets` rotating sets holds one growing buffer per input; tensor number i is read
    into set i % sets. Fresh memory for every read costs a page fault per page (on `small`,
    710K faults and half the merge's CPU time in the kernel). A set is reused only once its
    tensor is merged: `prefetch` starts loading tensor i + threads + 1 after tensor i is done,
    so threads + 1 sets suffice.
    """

    def __init__(self, sets: int) -> None:
        self._sets = sets
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def memory(self, index: int, slot: int) -> Callable[[int], torch.Tensor]:
        """Where input `slot` (0 the base, then the models) of tensor `index` is read."""
        key = (index % self._sets, slot)

        def take(nbytes: int) -> torch.Tensor:
            buffer = self._buffers.get(key)
            if buffer is None or buffer.numel() < nbytes:
                self._buffers[key] = buffer = torch.empty(nbytes, dtype=torch.uint8)
            return buffer[:nbytes]

        return take


def prefetch(names: list[str], fn: Callable[[str], T], threads: int) -> Generator[T, None, None]:
    """Yield fn(name) in order, with up to `threads` names loading ahead in the background."""
    if threads == 0:
        yield from (fn(n) for n in names)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nanmerge-load") as pool:
        pending: deque[Future[T]] = deque()
        try:
            for name in names:
                pending.append(pool.submit(fn, name))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # on an error, do not read what will never be merged
                future.cancel()


class BackgroundSink:
    """Hands (name, tensor) to `sink` from one writer thread, in order, one tensor queued.

    An error in the sink is raised in the caller at its next `__call__` or at exit; an
    error in the caller stops the writer without writing what is still queued.
    """

    def __init__(self, sink: Callable[[str, torch.Tensor], None]) -> None:
        self._sink = sink
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._drain, name="nanmerge-write", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:  # None: the caller is done
            if self._error is None and not self._abandoned:
                name, tensor = item
                try:
                    self._sink(name, tensor.to("cpu"))
                except BaseException as exc:  # handed to the caller, see _raise
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self._raise()
        self._queue.put((name, tensor))

    def __enter__(self) -> BackgroundSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._abandoned = exc is not None
        self._queue.put(None)
        self._thread.join()
        if exc is None:
            self._raise()


def to_cpu(sink: Callable[[str, torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
    return lambda name, tensor: sink(name, tensor.to("cpu"))
