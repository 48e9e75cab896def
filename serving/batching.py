"""Dynamic batching: concurrent requests share forward passes.

The knobs are TF Serving's (``max_batch_size``, ``batch_timeout_micros``,
``max_enqueued_batches``, ``num_batch_threads``), and so is the rule: a batch
closes when it is full or when its first image has waited ``batch_timeout``.
One :class:`DynamicBatcher` serves one model version.

One refinement over TF Serving: callers :meth:`~DynamicBatcher.announce` a
request when they start preprocessing it, and a batch waits for more images
only while announced requests are on their way. A lone request is not held for
``batch_timeout`` waiting for company that is not coming, so batching costs
nothing at low load and still fills batches under concurrency. Its queue is bounded in
images; a request that does not fit is shed at once (:class:`Overloaded`, 429)
instead of waiting behind work that would outlive its deadline. A request whose
deadline passes while it waits is dropped before its forward pass
(:class:`QueueTimeout`, 503), so late work never delays live work.

A request with more images than ``max_batch_size`` is split into chunks that
ride in consecutive batches; its result is the concatenation, in order.

A lone request (nothing queued, nothing announced, a forward-pass slot free) runs
its forward pass in the caller's thread: at low load there is no batch to form,
and the two thread handoffs of the queue would only add latency. ``num_threads``
bounds the forward passes running at once, the callers' included, so requests
arriving meanwhile queue and form the next batch as they would behind a batch
thread. Such a pass cannot be abandoned at the deadline; one that ends after it
is still a 504 (remote backends stop at the deadline themselves).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from contract.logs import log_fields
from serving.errors import (
    BackendError,
    BackendTimeout,
    Overloaded,
    QueueTimeout,
    ServiceUnavailable,
    ServingError,
)

log = logging.getLogger(__name__)

#: ``predict(batch, timeout_s, request_ids) -> outputs``; each output has the batch's rows.
PredictFn = Callable[[np.ndarray, float, Sequence[str]], dict[str, np.ndarray]]

_QUEUED, _RUNNING, _DONE, _CANCELLED = range(4)


class BatcherClosed(ServiceUnavailable):
    """The version left service before the request was queued (the caller re-resolves)."""

    code = "version_retired"


@dataclass(eq=False)
class _Item:
    inputs: np.ndarray
    deadline: float
    request_id: str
    enqueued_at: float
    state: int = _QUEUED
    started_at: float = 0.0
    finished_at: float = 0.0
    batch_size: int = 0
    outputs: dict[str, np.ndarray] | None = None
    error: ServingError | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class BatchResult:
    """A request's outputs with the time it spent queued and in the forward pass."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    predict_s: float
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class BatcherHooks:
    """Callbacks for metrics: queue depth changes (images) and batch sizes."""

    queue_depth: Callable[[int], None] = lambda delta: None
    batch_size: Callable[[int], None] = lambda size: None


class DynamicBatcher:
    """A bounded queue of images in front of one model version's ``predict``."""

    def __init__(
        self,
        predict: PredictFn,
        *,
        max_batch_size: int,
        batch_timeout_s: float,
        capacity: int,
        num_threads: int = 1,
        retry_after_s: float = 1.0,
        name: str = "batcher",
        hooks: BatcherHooks | None = None,
    ) -> None:
        if max_batch_size < 1 or capacity < 1 or num_threads < 1:
            raise ValueError("max_batch_size, capacity and num_threads must be >= 1")
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = max(0.0, batch_timeout_s)
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.name = name
        self._predict = predict
        self._hooks = hooks or BatcherHooks()
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._announced = 0
        self.num_threads = num_threads
        self._running = 0  # forward passes now, batch threads' and callers'
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(num_threads)
        ]
        for t in self._threads:
            t.start()

    # -- client side -------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Images waiting (not yet in a forward pass)."""
        return self._queued_images

    def announce(self) -> None:
        """A request is being preprocessed for this batcher; follow with run() or withdraw()."""
        with self._cond:
            self._announced += 1

    def withdraw(self) -> None:
        """An announced request will not arrive (it failed before queueing)."""
        with self._cond:
            self._announced = max(0, self._announced - 1)
            self._cond.notify_all()

    def run(
        self,
        inputs: np.ndarray,
        *,
        deadline: float,
        request_id: str = "",
        announced: bool = False,
    ) -> BatchResult:
        """Queue ``inputs`` [n, ...], wait for the outputs; raises on shedding or deadline.

        ``deadline`` is a ``time.monotonic()`` instant; ``announced`` says the
        request was announced (its announcement ends here, whatever happens).
        """
        n = int(inputs.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        now = time.monotonic()
        chunks = [
            _Item(inputs[i : i + self.max_batch_size], deadline, request_id, now)
            for i in range(0, n, self.max_batch_size)
        ]
        with self._cond:
            if announced:
                self._announced = max(0, self._announced - 1)
                self._cond.notify_all()
            if self._closed:
                raise BatcherClosed(f"{self.name} is no longer serving")
            if self._queued_images + n > self.capacity:
                raise Overloaded(
                    f"queue for {self.name} is full ({self._queued_images} of {self.capacity} "
                    f"images waiting)",
                    retry_after=self.retry_after_s,
                )
            here = len(chunks) == 1 and not self._queue and not self._announced
            here = here and self._running < self.num_threads
            if here:
                self._running += 1
                chunks[0].state = _RUNNING
                chunks[0].started_at = now
            else:
                self._queue.extend(chunks)
                self._queued_images += n
                self._cond.notify_all()
        if here:
            return self._run_here(chunks[0])
        self._hooks.queue_depth(n)
        for item in chunks:
            remaining = deadline - time.monotonic()
            if not item.done.wait(max(0.0, remaining)):
                self._abandon(chunks)
                break
        return self._collect(chunks)

    def _run_here(self, item: _Item) -> BatchResult:
        """The caller-runs path: ``item`` holds a forward-pass slot already."""
        self._execute_in_slot([item])
        if item.error is None and item.finished_at > item.deadline:
            raise BackendTimeout(f"{self.name}: no answer before the request deadline")
        return self._collect([item])

    def _abandon(self, chunks: list[_Item]) -> None:
        """The deadline passed: cancel chunks still queued; running ones will time out."""
        removed = 0
        with self._cond:
            for item in chunks:
                if item.state == _QUEUED:
                    item.state = _CANCELLED
                    item.error = QueueTimeout(
                        "deadline passed while waiting for a batch", retry_after=self.retry_after_s
                    )
                    self._queue.remove(item)
                    removed += int(item.inputs.shape[0])
                    item.done.set()
            self._queued_images -= removed
        if removed:
            self._hooks.queue_depth(-removed)

    def _collect(self, chunks: list[_Item]) -> BatchResult:
        for item in chunks:
            if item.error is not None:
                raise item.error
            if item.state != _DONE:
                # Still inside a forward pass when the deadline passed.
                raise BackendTimeout(f"{self.name}: no answer before the request deadline")
        outputs = {
            k: np.concatenate([c.outputs[k] for c in chunks]) if len(chunks) > 1 else v
            for k, v in chunks[0].outputs.items()  # type: ignore[union-attr]
        }
        queue_s = sum(c.started_at - c.enqueued_at for c in chunks)
        predict_s = sum(c.finished_at - c.started_at for c in chunks)
        return BatchResult(outputs, queue_s, predict_s, tuple(c.batch_size for c in chunks))

    # -- worker side -------------------------------------------------------------
    def _take_batch(self) -> list[_Item] | None:
        """Wait for a batch per TF Serving's rule; None when closed and drained."""
        with self._cond:
            while True:
                while not self._closed and (not self._queue or self._running >= self.num_threads):
                    self._cond.wait()
                if not self._queue:
                    return None
                if self._running >= self.num_threads:  # closed: drain once a slot frees
                    self._cond.wait()
                    continue
                first = self._queue[0].enqueued_at
                while (
                    self._queued_images < self.max_batch_size
                    and self._announced > 0
                    and not self._closed
                ):
                    remaining = first + self.batch_timeout_s - time.monotonic()
                    if remaining <= 0 or not self._queue:
                        break
                    self._cond.wait(remaining)
                if not self._queue:
                    continue  # another worker took it
                batch: list[_Item] = []
                size = 0
                now = time.monotonic()
                while self._queue:
                    item = self._queue[0]
                    n = int(item.inputs.shape[0])
                    if size + n > self.max_batch_size:
                        break
                    self._queue.popleft()
                    self._queued_images -= n
                    if item.deadline <= now:
                        item.state = _CANCELLED
                        item.error = QueueTimeout(
                            "deadline passed while waiting for a batch",
                            retry_after=self.retry_after_s,
                        )
                        item.done.set()
                        self._hooks.queue_depth(-n)
                        continue
                    item.state = _RUNNING
                    item.started_at = now
                    batch.append(item)
                    size += n
                if batch:
                    self._running += 1
                    self._hooks.queue_depth(-size)
                    return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._execute_in_slot(batch)

    def _execute_in_slot(self, batch: list[_Item]) -> None:
        """Run ``batch``, which holds a forward-pass slot; free the slot after."""
        try:
            self._execute(batch)
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _execute(self, batch: list[_Item]) -> None:
        """Run one batch; lines logged meanwhile carry the ids of the requests it serves."""
        ids = [item.request_id for item in batch if item.request_id]
        # On a batch thread no request's id is bound: bind the batch's own. One request:
        # its ``request_id``, as in the request's thread; several: all of them.
        if len(ids) == 1:
            fields: dict[str, object] = {"request_id": ids[0]}
        else:
            fields = {"request_ids": ids} if ids else {}
        with log_fields(**fields):
            self._execute_batch(batch, ids)

    def _execute_batch(self, batch: list[_Item], ids: list[str]) -> None:
        sizes = [int(item.inputs.shape[0]) for item in batch]
        total = sum(sizes)
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([i.inputs for i in batch])
        timeout = max(0.001, max(item.deadline for item in batch) - time.monotonic())
        error: ServingError | None = None
        outputs: dict[str, np.ndarray] = {}
        try:
            outputs = self._predict(inputs, timeout, ids)
            bad = [k for k, v in outputs.items() if v.shape[:1] != (total,)]
            if bad:
                raise BackendError(f"outputs {bad} do not have {total} rows")
        except ServingError as exc:
            error = exc
        except Exception as exc:  # a bug in a backend must fail the batch, not the thread
            log.exception("%s: predict failed", self.name)
            error = BackendError(f"{self.name}: {type(exc).__name__}: {exc}")
        finished = time.monotonic()
        self._hooks.batch_size(total)
        offset = 0
        for item, n in zip(batch, sizes, strict=True):
            item.finished_at = finished
            item.batch_size = total
            if error is None:
                item.outputs = {k: v[offset : offset + n] for k, v in outputs.items()}
            else:
                item.error = error
            item.state = _DONE
            offset += n
            item.done.set()

    # -- lifecycle ---------------------------------------------------------------
    def close(self, *, wait: bool = False, timeout: float = 30.0) -> None:
        """Stop accepting work; queued work still runs. ``wait`` joins the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            end = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, end - time.monotonic()))
