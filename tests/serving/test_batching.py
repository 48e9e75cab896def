"""The dynamic batcher: batch formation, bounds, deadlines, shedding, splitting."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from serving.api.errors import http_status
from serving.batching import BatcherClosed, BatcherHooks, DynamicBatcher
from serving.errors import BackendError, BackendTimeout, Overloaded, QueueTimeout
from tests.helpers.log_lines import captured_lines


class Recorder:
    """A predict function that doubles its input and records batch sizes."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.sizes: list[int] = []
        self.ids: list[list[str]] = []

    def __call__(self, x: np.ndarray, timeout: float, ids) -> dict[str, np.ndarray]:
        self.sizes.append(int(x.shape[0]))
        self.ids.append(list(ids))
        if self.delay_s:
            time.sleep(self.delay_s)
        return {"double": x * 2, "sum": x.reshape(len(x), -1).sum(1)}


def far() -> float:
    return time.monotonic() + 10


def make(predict, **kw) -> DynamicBatcher:
    args = dict(max_batch_size=4, batch_timeout_s=0.05, capacity=16, num_threads=1)
    args.update(kw)
    return DynamicBatcher(predict, **args)


def test_each_request_gets_its_own_rows():
    rec = Recorder()
    b = make(rec)
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    result = b.run(x, deadline=far(), request_id="r1")
    np.testing.assert_array_equal(result.outputs["double"], x * 2)
    assert result.batch_sizes == (3,)
    assert rec.ids == [["r1"]]
    b.close(wait=True)


def test_concurrent_requests_share_a_batch():
    rec = Recorder()
    b = make(rec, batch_timeout_s=0.5)
    results = {}
    for _ in range(4):
        b.announce()

    def client(i: int) -> None:
        x = np.full((1, 2), i, np.float32)
        results[i] = b.run(x, deadline=far(), request_id=str(i), announced=True)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert rec.sizes == [4]  # one forward pass for the four requests
    for i, r in results.items():
        np.testing.assert_array_equal(r.outputs["double"], np.full((1, 2), 2 * i))
    b.close(wait=True)


def test_lines_logged_for_a_batch_carry_the_ids_of_the_requests_it_serves():
    backend_log = logging.getLogger("tests.backend")

    def predict(x: np.ndarray, timeout: float, ids) -> dict[str, np.ndarray]:
        backend_log.info("forward pass of %d", len(x))
        if x[0, 0] < 0:
            raise RuntimeError("a backend bug")
        return {"y": x}

    b = make(predict, batch_timeout_s=0.5)
    for _ in range(3):
        b.announce()
    with captured_lines() as lines:
        threads = [
            threading.Thread(
                target=b.run,
                args=(np.full((1, 2), i, np.float32),),
                kwargs={"deadline": far(), "request_id": f"r{i}", "announced": True},
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        with pytest.raises(BackendError):
            b.run(np.full((1, 2), -1, np.float32), deadline=far(), request_id="solo")
    b.close(wait=True)
    shared, solo, failure = lines
    # Several requests: all their ids, as a list; one request: its id, as in its own thread.
    assert (shared["message"], sorted(shared["request_ids"])) == (
        "forward pass of 3",
        ["r0", "r1", "r2"],
    )
    assert "request_id" not in shared
    assert (solo["request_id"], failure["request_id"]) == ("solo", "solo")
    assert "RuntimeError: a backend bug" in failure["exception"]


def test_a_lone_request_does_not_wait_for_the_timeout():
    b = make(Recorder(), batch_timeout_s=5.0)
    t0 = time.monotonic()
    b.run(np.ones((1, 2), np.float32), deadline=far())
    assert time.monotonic() - t0 < 2.0
    b.close(wait=True)


def test_announced_requests_hold_the_batch_open_until_timeout():
    rec = Recorder()
    b = make(rec, batch_timeout_s=0.2)
    b.announce()  # a request that never arrives
    t0 = time.monotonic()
    b.run(np.ones((1, 2), np.float32), deadline=far())
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 2.0
    b.withdraw()
    b.close(wait=True)


def test_large_requests_are_split_and_reassembled():
    rec = Recorder()
    b = make(rec, max_batch_size=4, capacity=16)
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    result = b.run(x, deadline=far())
    np.testing.assert_array_equal(result.outputs["double"], x * 2)
    assert sorted(rec.sizes) == [2, 4, 4]
    b.close(wait=True)


def test_full_queue_sheds_with_retry_after():
    gate = threading.Event()
    running = threading.Event()

    def blocked(x, timeout, ids):
        running.set()
        gate.wait(5)
        return {"y": x}

    b = make(blocked, max_batch_size=1, capacity=2, batch_timeout_s=0.0)
    started = []
    threads = []
    for i in range(3):  # one in the forward pass, then two queued
        t = threading.Thread(target=lambda: started.append(b.run(np.ones((1, 1)), deadline=far())))
        t.start()
        threads.append(t)
        if i == 0:
            assert running.wait(5)
    deadline = time.monotonic() + 5
    while b.depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Overloaded) as info:
        b.run(np.ones((1, 1)), deadline=far())
    assert http_status(info.value) == 429 and info.value.retry_after is not None
    gate.set()
    for t in threads:
        t.join(5)
    assert len(started) == 3
    b.close(wait=True)


def test_deadline_in_queue_is_503_and_skips_the_forward_pass():
    gate = threading.Event()
    rec = []

    def blocked(x, timeout, ids):
        rec.append(len(x))
        gate.wait(5)
        return {"y": x}

    b = make(blocked, max_batch_size=1, capacity=4, batch_timeout_s=0.0)
    first = threading.Thread(target=lambda: b.run(np.ones((1, 1)), deadline=far()))
    first.start()
    while not rec:
        time.sleep(0.005)
    with pytest.raises(QueueTimeout) as info:
        b.run(np.ones((1, 1)), deadline=time.monotonic() + 0.1)
    assert http_status(info.value) == 503
    gate.set()
    first.join(5)
    time.sleep(0.05)
    assert rec == [1]  # the expired request never reached predict
    assert b.depth == 0
    b.close(wait=True)


def test_deadline_during_predict_is_504():
    # A lone request: its forward pass runs in the calling thread, and ends late.
    b = make(Recorder(delay_s=0.5), batch_timeout_s=0.0)
    with pytest.raises(BackendTimeout):
        b.run(np.ones((1, 1)), deadline=time.monotonic() + 0.1)
    b.close(wait=True)


def test_deadline_during_a_batch_threads_predict_is_504_at_the_deadline():
    b = make(Recorder(delay_s=1.0), batch_timeout_s=0.0)
    b.announce()  # another request on its way: this one queues for the batch thread
    t0 = time.monotonic()
    with pytest.raises(BackendTimeout):
        b.run(np.ones((1, 1)), deadline=t0 + 0.1)
    assert time.monotonic() - t0 < 0.8  # abandoned at the deadline, not after the pass
    b.withdraw()
    b.close(wait=True)


def test_a_lone_request_runs_in_the_calling_thread():
    threads, depth = [], []

    def predict(x, timeout, ids):
        threads.append(threading.get_ident())
        return {"y": x}

    b = make(predict, hooks=BatcherHooks(queue_depth=depth.append))
    result = b.run(np.ones((2, 1)), deadline=far())
    assert threads == [threading.get_ident()]
    assert result.batch_sizes == (2,) and result.queue_s == 0.0
    assert depth == []  # never queued
    b.close(wait=True)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_forward_passes_never_exceed_num_threads(num_threads):
    """Callers running their own pass and batch threads share ``num_threads`` slots;
    requests arriving during a pass queue and ride in the next batch."""
    lock = threading.Lock()
    running, peak, sizes = [0], [0], []

    def predict(x, timeout, ids):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            sizes.append(len(x))
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return {"y": x * 2}

    b = make(predict, max_batch_size=8, capacity=64, batch_timeout_s=0.0, num_threads=num_threads)
    errors = []

    def client(i: int) -> None:
        for j in range(5):
            x = np.full((1, 1), 10 * i + j, np.float32)
            out = b.run(x, deadline=far())
            if out.outputs["y"][0, 0] != 2 * x[0, 0]:
                errors.append((i, j))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(20)
    assert not any(t.is_alive() for t in clients) and errors == []
    assert sum(sizes) == 40
    assert peak[0] <= num_threads, peak
    assert max(sizes) > 1  # batches formed behind the running passes
    b.close(wait=True)


def test_backend_failure_reaches_every_request_of_the_batch():
    def broken(x, timeout, ids):
        raise RuntimeError("model exploded")

    b = make(broken)
    with pytest.raises(BackendError, match="model exploded"):
        b.run(np.ones((2, 1)), deadline=far())
    # The worker survives a failing batch.
    with pytest.raises(BackendError):
        b.run(np.ones((1, 1)), deadline=far())
    b.close(wait=True)


def test_wrong_row_count_is_a_backend_error():
    b = make(lambda x, timeout, ids: {"y": x[:1]})
    with pytest.raises(BackendError, match="rows"):
        b.run(np.ones((3, 1)), deadline=far())
    b.close(wait=True)


def test_closed_batcher_refuses_new_work_but_finishes_queued():
    rec = Recorder(delay_s=0.1)
    b = make(rec, max_batch_size=1, batch_timeout_s=0.0)
    out = []
    t = threading.Thread(target=lambda: out.append(b.run(np.ones((1, 1)), deadline=far())))
    t.start()
    time.sleep(0.02)
    b.close()
    with pytest.raises(BatcherClosed):
        b.run(np.ones((1, 1)), deadline=far())
    t.join(5)
    assert len(out) == 1


def test_hooks_see_depth_and_batch_sizes():
    depth, sizes = [], []
    b = make(Recorder(), hooks=BatcherHooks(queue_depth=depth.append, batch_size=sizes.append))
    b.announce()  # another request on its way: this one queues
    b.run(np.ones((3, 1)), deadline=far())
    b.withdraw()
    b.close(wait=True)
    assert sum(depth) == 0 and 3 in depth
    assert sizes == [3]
