"""The capture store: atomic shards, size cap, several writer processes, feedback joins."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from calibration import capture_store as samples
from calibration.capture_store import (
    ExpiredRequestError,
    FeedbackConflictError,
    InvalidFeedbackError,
    SampleStore,
    UnknownRequestError,
    iter_samples,
    load_samples,
    record_feedback,
)

MODEL = "tiny_classifier"


def _batch(n: int = 1, value: float = 0.0, size: int = 8) -> np.ndarray:
    return np.full((n, size, size, 3), value, np.float32)


def _shard_bytes(root: Path, model: str = MODEL) -> list[int]:
    d = root / model / samples.SHARDS
    return [
        p.stat().st_size for p in d.iterdir() if p.suffix == ".npz" and not p.name.startswith(".")
    ]


def _wait(proc: mp.Process, timeout: float = 60.0) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        pytest.fail(f"process {proc.pid} did not finish in {timeout} s")


# -- writing and reading ---------------------------------------------------------


def test_captured_samples_read_back_exactly(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    path = store.capture(MODEL, 3, "req-a", x, np.array([1, 2]))
    assert path is not None and path.exists() and path.parent.name == samples.SHARDS
    got = list(iter_samples(tmp_path, MODEL))
    assert [(s.request_id, s.index, s.version) for s in got] == [("req-a", 0, 3), ("req-a", 1, 3)]
    np.testing.assert_array_equal(np.stack([s.input for s in got]), x)
    assert [int(s.prediction) for s in got] == [1, 2]
    assert all(s.label is None and s.raw is None for s in got)
    assert abs(got[0].captured_at - time.time()) < 60


def test_rate_and_off_switch_decide_what_is_captured(tmp_path):
    off = SampleStore(tmp_path / "off", rate=1.0, enabled=False)
    zero = SampleStore(tmp_path / "zero", rate=0.0)
    per_model = SampleStore(tmp_path / "pm", rate={"other": 1.0, "*": 0.0})
    for store in (off, zero, per_model):
        assert store.capture(MODEL, 1, "r", _batch()) is None
    assert not any((tmp_path / d / MODEL / samples.SHARDS).exists() for d in ("off", "zero", "pm"))
    assert per_model.capture("other", 1, "r", _batch()) is not None
    half = SampleStore(tmp_path / "half", rate=0.5, seed=1)
    taken = sum(half.capture(MODEL, 1, f"r{i}", _batch()) is not None for i in range(400))
    assert 150 < taken < 250  # binomial(400, 0.5): far outside 6 sigma otherwise
    assert len(list(iter_samples(tmp_path / "half", MODEL))) == taken
    with pytest.raises(ValueError):
        SampleStore(tmp_path, rate=1.5)


def test_raw_bytes_are_kept_only_when_configured(tmp_path):
    raw = [b"\x89PNG fake-bytes-1", b"second"]
    SampleStore(tmp_path / "no", rate=1.0).capture(MODEL, 1, "r", _batch(2), raw=raw)
    SampleStore(tmp_path / "yes", rate=1.0, keep_raw=True).capture(
        MODEL, 1, "r", _batch(2), raw=raw
    )
    assert [s.raw for s in iter_samples(tmp_path / "no", MODEL)] == [None, None]
    assert [s.raw for s in iter_samples(tmp_path / "yes", MODEL)] == raw
    shard = next((tmp_path / "no" / MODEL / samples.SHARDS).iterdir())
    with np.load(shard) as z:
        assert "raw_bytes" not in z.files


def test_bad_capture_input_is_a_clear_error(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    with pytest.raises(ValueError, match="batch"):
        store.capture(MODEL, 1, "r", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="one entry per image"):
        store.capture(MODEL, 1, "r", _batch(2), predictions=[1, 2, 3])
    with pytest.raises(InvalidFeedbackError):
        store.capture("../escape", 1, "r", _batch())
    with pytest.raises(InvalidFeedbackError):
        store.capture(MODEL, 1, "", _batch())


def test_load_samples_takes_the_newest_of_the_right_shape(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    for i in range(6):
        store.capture(MODEL, 1, f"r{i}", _batch(1, float(i)))
    store.capture(MODEL, 1, "other-size", _batch(1, 9.0, size=4))
    got = load_samples(tmp_path, MODEL, max_samples=3, input_shape=(8, 8, 3))
    assert got.request_ids == ["r3", "r4", "r5"]  # newest three, oldest first
    assert got.inputs.shape == (3, 8, 8, 3) and got.inputs[:, 0, 0, 0].tolist() == [3.0, 4.0, 5.0]
    assert got.skipped == {"other_input_shape": 1}
    assert len(load_samples(tmp_path, "never_captured")) == 0


# -- crash safety ------------------------------------------------------------------


def _crash_during_rename(root: str, ready: mp.Event) -> None:
    """Write a shard but hang where the rename would publish it (then get killed)."""
    store = SampleStore(root, rate=1.0)

    def hang(src, dst):
        ready.set()
        time.sleep(120)

    os.rename = hang  # this process exists only to die here
    store.capture(MODEL, 1, "half-written", _batch(4, 1.0))


def test_a_writer_killed_mid_write_leaves_nothing_readable(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    store.capture(MODEL, 1, "complete", _batch(1, 2.0))
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_crash_during_rename, args=(str(tmp_path), ready))
    proc.start()
    try:
        assert ready.wait(60), "writer never reached the rename"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _wait(proc)
    shard_dir = tmp_path / MODEL / samples.SHARDS
    leftovers = [p for p in shard_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # fully written, never renamed
    assert [s.request_id for s in iter_samples(tmp_path, MODEL)] == ["complete"]
    with pytest.raises(UnknownRequestError):
        record_feedback(tmp_path, "half-written", ["a"] * 4)
    # A crashed writer's temp file is removed by eviction once it is old.
    old = time.time() - 2 * 3600
    os.utime(leftovers[0], (old, old))
    store.enforce_limits(MODEL)
    assert not leftovers[0].exists()


def test_a_corrupt_shard_is_skipped_not_fatal(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    store.capture(MODEL, 1, "good", _batch())
    bad = store.capture(MODEL, 1, "bad", _batch())
    bad.write_bytes(bad.read_bytes()[:100])  # e.g. a disk that lost the tail
    skipped: dict[str, int] = {}
    got = list(iter_samples(tmp_path, MODEL, skipped=skipped))
    assert [s.request_id for s in got] == ["good"] and skipped == {"unreadable": 1}


# -- size cap and expiry ------------------------------------------------------------


def test_size_cap_drops_the_oldest_shards_first(tmp_path):
    probe = SampleStore(tmp_path / "probe", rate=1.0)
    size = probe.capture(MODEL, 1, "r00", _batch()).stat().st_size
    store = SampleStore(tmp_path / "s", rate=1.0, max_bytes=5 * size + size // 2)
    for i in range(12):
        store.capture(MODEL, 1, f"r{i:02d}", _batch(1, float(i)))
        assert sum(_shard_bytes(tmp_path / "s")) <= store.max_bytes
    kept = [s.request_id for s in iter_samples(tmp_path / "s", MODEL)]
    assert kept == [f"r{i:02d}" for i in range(7, 12)]
    with pytest.raises(ExpiredRequestError) as info:
        record_feedback(tmp_path / "s", "r00", ["x"])
    assert info.value.code == "expired_request_id"
    assert record_feedback(tmp_path / "s", "r11", ["x"]).created


def test_expired_ids_are_forgotten_after_a_while(tmp_path):
    store = SampleStore(tmp_path, rate=1.0, max_bytes=1, forget_after_seconds=0.0)
    store.capture(MODEL, 1, "first", _batch())  # over the cap at once: dropped
    with pytest.raises((ExpiredRequestError, UnknownRequestError)):
        record_feedback(tmp_path, "first", ["x"])
    time.sleep(0.01)
    store.enforce_limits(MODEL)  # the forget step runs with eviction
    with pytest.raises(UnknownRequestError) as info:
        record_feedback(tmp_path, "first", ["x"])
    assert info.value.code == "unknown_request_id"
    assert not list((tmp_path / MODEL / samples.INDEX).rglob("*.json"))


def test_age_limit_drops_old_shards(tmp_path):
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "old", _batch())
    time.sleep(0.05)
    boundary = time.time()
    time.sleep(0.5)
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "new", _batch())
    # An age limit that puts the boundary between the two captures (robust to a slow disk).
    SampleStore(tmp_path, max_age_seconds=time.time() - boundary).enforce_limits(MODEL)
    assert [s.request_id for s in iter_samples(tmp_path, MODEL)] == ["new"]
    with pytest.raises(ExpiredRequestError):
        record_feedback(tmp_path, "old", ["x"])


# -- several processes ----------------------------------------------------------------


def _writer(root: str, worker: int, count: int, max_bytes: int) -> None:
    store = SampleStore(root, rate=1.0, max_bytes=max_bytes)
    for i in range(count):
        store.capture(MODEL, 1, f"w{worker}-{i}", _batch(1, float(worker)))


def test_several_writer_processes_respect_the_cap_and_never_corrupt(tmp_path):
    size = SampleStore(tmp_path / "probe", rate=1.0).capture(MODEL, 1, "p", _batch()).stat().st_size
    cap = 40 * size
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "s"), w, 60, cap)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        _wait(p, 120)
    assert all(p.exitcode == 0 for p in procs)
    shards = _shard_bytes(tmp_path / "s")
    # Eviction is serialised and runs after every write: the last writer's pass saw
    # every shard, so the total is within the cap once all writers are done.
    assert sum(shards) <= cap and len(shards) >= 30
    skipped: dict[str, int] = {}
    got = list(iter_samples(tmp_path / "s", MODEL, skipped=skipped))
    assert skipped == {} and len(got) == len(shards)
    assert len({s.request_id for s in got}) == len(got)
    for s in got:  # each shard holds exactly what its writer wrote
        assert float(s.input[0, 0, 0]) == float(s.request_id.split("-")[0][1:])
    assert not [
        p for p in (tmp_path / "s" / MODEL / samples.SHARDS).iterdir() if p.name.startswith(".")
    ]
    # Every id is either live or expired: none was lost from the index.
    live = {s.request_id for s in got}
    for w in range(4):
        for i in range(60):
            rid = f"w{w}-{i}"
            if rid in live:
                assert record_feedback(tmp_path / "s", rid, [0]).created
            else:
                with pytest.raises(ExpiredRequestError):
                    record_feedback(tmp_path / "s", rid, [0])


def _feedback_racer(root: str, label: str, ready, go, out) -> None:
    ready.put(label)
    if go.wait(60):  # all racers start together
        try:
            record_feedback(root, "contested", [label])
            out.put(("ok", label))
        except FeedbackConflictError:
            out.put(("conflict", label))


def test_concurrent_conflicting_feedback_has_exactly_one_winner(tmp_path):
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "contested", _batch())
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    labels = ["a", "b", "c", "a"]
    procs = [
        ctx.Process(target=_feedback_racer, args=(str(tmp_path), lab, ready, go, out))
        for lab in labels
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        _wait(p)
    winner = next(s.label for s in iter_samples(tmp_path, MODEL, labelled=True))
    assert sorted(label for _, label in results) == sorted(labels)
    for status, label in results:
        assert status == ("ok" if label == winner else "conflict")


# -- feedback ---------------------------------------------------------------------------


def test_feedback_joins_labels_and_is_idempotent(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    store.capture(MODEL, 1, "one", _batch())
    store.capture(MODEL, 1, "pair", _batch(2))
    store.capture("other_model", 1, "elsewhere", _batch())
    first = record_feedback(tmp_path, "one", ["cat"])
    assert first.created and first.model == MODEL and first.labels == ("cat",)
    again = record_feedback(tmp_path, "one", ["cat"])
    assert not again.created
    assert record_feedback(tmp_path, "pair", [0, 2]).created
    assert record_feedback(tmp_path, "elsewhere", "dog", model="other_model").model == "other_model"
    assert [(s.request_id, s.label) for s in iter_samples(tmp_path, MODEL, labelled=True)] == [
        ("one", "cat"),
        ("pair", 0),
        ("pair", 2),
    ]
    assert list(iter_samples(tmp_path, MODEL, labelled=False)) == []
    assert load_samples(tmp_path, MODEL).labelled.tolist() == [True, True, True]


def test_feedback_errors_are_typed(tmp_path):
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "one", _batch())
    record_feedback(tmp_path, "one", ["cat"])
    with pytest.raises(FeedbackConflictError) as conflict:
        record_feedback(tmp_path, "one", ["dog"])
    assert conflict.value.code == "feedback_conflict" and "cat" in str(conflict.value)
    with pytest.raises(UnknownRequestError) as unknown:
        record_feedback(tmp_path, "never-seen", ["cat"])
    assert unknown.value.code == "unknown_request_id" and "never-seen" in str(unknown.value)
    with pytest.raises(UnknownRequestError):
        record_feedback(tmp_path, "one", ["cat"], model="other_model")
    for bad in ([], ["a", "b"], [None], [True], [-1], [""]):
        with pytest.raises(InvalidFeedbackError) as invalid:
            record_feedback(tmp_path, "one", bad)
        assert invalid.value.code == "invalid_feedback"
    with pytest.raises(InvalidFeedbackError, match="unknown label"):
        record_feedback(tmp_path, "one", ["cow"], allowed=["cat", "dog"])
    with pytest.raises(InvalidFeedbackError, match="out of range"):
        record_feedback(tmp_path, "one", [5], allowed=["cat", "dog"])
    with pytest.raises(InvalidFeedbackError):
        record_feedback(tmp_path, "x" * 1000, ["cat"])
