"""The decoded-pixel limit of one worker process, over every request it is decoding.

The request budget (:mod:`serving.service.pixel_budget`) bounds one request; a worker
runs many requests on its threads at once, and each decodes one image at a time into
memory that follows its pixels (Pillow holds RGB as 4 bytes a pixel, then the array
copy). Without a shared bound, a flood of flat 6000x6000 PNGs (a few kilobytes each on
the wire) has every thread of a worker holding its own 36 M-pixel decode at once.

So each decode first reserves the pixels it will hold here (the header's, or a
photo-sized JPEG decode's drafted size: :func:`contract.preprocessing.decode_pixels`) and
gives them back once the image is preprocessed (the model input is small). A reservation that does not fit
is refused at once with :class:`DecodeCapacityExceeded` (503 with Retry-After): a
busy worker says so instead of queueing work it cannot hold.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from serving.errors import DecodeCapacityExceeded


class WorkerPixelLimit:
    """Decoded pixels in flight in this process, bounded by ``limit``; thread-safe."""

    def __init__(self, limit: int, retry_after_s: float) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Pixels reserved now by decodes under way."""
        return self._in_flight

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` for the block; :class:`DecodeCapacityExceeded` when they do not fit."""
        with self._lock:
            if self._in_flight + pixels > self.limit:
                raise DecodeCapacityExceeded(
                    f"this worker is decoding {self._in_flight} pixels; {pixels} more would "
                    f"pass its limit of {self.limit}",
                    retry_after=self.retry_after_s,
                    extra={"worker_pixels": self._in_flight, "max_worker_pixels": self.limit},
                )
            self._in_flight += pixels
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= pixels
