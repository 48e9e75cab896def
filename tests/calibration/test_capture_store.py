"""The capture store: atomic shards, size cap, several writer processes, image geometry."""

from __future__ import annotations

import json
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
    InvalidFeedbackError,
    SampleStore,
    UnknownRequestError,
)
from calibration.feedback import record_feedback
from calibration.samples import iter_samples, load_samples
from contract.preprocessing import ImageGeometry, PreprocessSpec, resize
from tests.helpers.capture_store import MODEL, image_batch, join_or_fail


def _shard_bytes(root: Path, model: str = MODEL) -> list[int]:
    d = root / model / samples.SHARDS
    return [
        p.stat().st_size for p in d.iterdir() if p.suffix == ".npz" and not p.name.startswith(".")
    ]


# -- writing and reading ---------------------------------------------------------


def test_shards_carry_the_geometry_and_task(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    spec = PreprocessSpec(8, 8, geometry="letterbox")
    geoms = [resize(np.zeros((h, 20, 3), np.uint8), spec)[1] for h in (10, 40)]
    path = store.capture(MODEL, 1, "with", image_batch(2), geometry=geoms, task="detection")
    with np.load(path) as z:
        assert z["geometry"].dtype == np.float64 and z["geometry"].shape == (2, 8)
        assert [ImageGeometry.from_array(row) for row in z["geometry"]] == geoms
        assert str(z["task"]) == "detection"
    entry = json.loads(samples.keyed_path(tmp_path / MODEL / samples.INDEX, "with").read_text())
    assert entry["task"] == "detection" and entry["geometry"] is True
    old = store.capture(MODEL, 1, "without", image_batch())
    assert samples.read_geometry(old) is None
    with pytest.raises(ValueError, match="geometry"):
        store.capture(MODEL, 1, "short", image_batch(2), geometry=geoms[:1])
    with pytest.raises(ValueError, match="task"):
        store.capture(MODEL, 1, "bad-task", image_batch(), task="segmentation")


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
        assert store.capture(MODEL, 1, "r", image_batch()) is None
    assert not any((tmp_path / d / MODEL / samples.SHARDS).exists() for d in ("off", "zero", "pm"))
    assert per_model.capture("other", 1, "r", image_batch()) is not None
    half = SampleStore(tmp_path / "half", rate=0.5, seed=1)
    taken = sum(half.capture(MODEL, 1, f"r{i}", image_batch()) is not None for i in range(400))
    assert 150 < taken < 250  # binomial(400, 0.5): far outside 6 sigma otherwise
    assert len(list(iter_samples(tmp_path / "half", MODEL))) == taken
    with pytest.raises(ValueError):
        SampleStore(tmp_path, rate=1.5)


def test_raw_bytes_are_kept_only_when_configured(tmp_path):
    raw = [b"\x89PNG fake-bytes-1", b"second"]
    SampleStore(tmp_path / "no", rate=1.0).capture(MODEL, 1, "r", image_batch(2), raw=raw)
    SampleStore(tmp_path / "yes", rate=1.0, keep_raw=True).capture(
        MODEL, 1, "r", image_batch(2), raw=raw
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
        store.capture(MODEL, 1, "r", image_batch(2), predictions=[1, 2, 3])
    with pytest.raises(InvalidFeedbackError):
        store.capture("../escape", 1, "r", image_batch())
    with pytest.raises(InvalidFeedbackError):
        store.capture(MODEL, 1, "", image_batch())


def test_load_samples_takes_the_newest_of_the_right_shape(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    for i in range(6):
        store.capture(MODEL, 1, f"r{i}", image_batch(1, float(i)))
    store.capture(MODEL, 1, "other-size", image_batch(1, 9.0, size=4))
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
    store.capture(MODEL, 1, "half-written", image_batch(4, 1.0))


def test_a_writer_killed_mid_write_leaves_nothing_readable(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    store.capture(MODEL, 1, "complete", image_batch(1, 2.0))
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_crash_during_rename, args=(str(tmp_path), ready))
    proc.start()
    try:
        assert ready.wait(60), "writer never reached the rename"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        join_or_fail(proc)
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
    store.capture(MODEL, 1, "good", image_batch())
    bad = store.capture(MODEL, 1, "bad", image_batch())
    bad.write_bytes(bad.read_bytes()[:100])  # e.g. a disk that lost the tail
    skipped: dict[str, int] = {}
    got = list(iter_samples(tmp_path, MODEL, skipped=skipped))
    assert [s.request_id for s in got] == ["good"] and skipped == {"unreadable": 1}


# -- size cap and expiry ------------------------------------------------------------


def test_size_cap_drops_the_oldest_shards_first(tmp_path):
    probe = SampleStore(tmp_path / "probe", rate=1.0)
    size = probe.capture(MODEL, 1, "r00", image_batch()).stat().st_size
    store = SampleStore(tmp_path / "s", rate=1.0, max_bytes=5 * size + size // 2)
    for i in range(12):
        store.capture(MODEL, 1, f"r{i:02d}", image_batch(1, float(i)))
        assert sum(_shard_bytes(tmp_path / "s")) <= store.max_bytes
    kept = [s.request_id for s in iter_samples(tmp_path / "s", MODEL)]
    assert kept == [f"r{i:02d}" for i in range(7, 12)]
    with pytest.raises(ExpiredRequestError) as info:
        record_feedback(tmp_path / "s", "r00", ["x"])
    assert info.value.code == "expired_request_id"
    assert record_feedback(tmp_path / "s", "r11", ["x"]).created


def test_expired_ids_are_forgotten_after_a_while(tmp_path):
    store = SampleStore(tmp_path, rate=1.0, max_bytes=1, forget_after_seconds=0.0)
    store.capture(MODEL, 1, "first", image_batch())  # over the cap at once: dropped
    with pytest.raises((ExpiredRequestError, UnknownRequestError)):
        record_feedback(tmp_path, "first", ["x"])
    time.sleep(0.01)
    store.enforce_limits(MODEL)  # the forget step runs with eviction
    with pytest.raises(UnknownRequestError) as info:
        record_feedback(tmp_path, "first", ["x"])
    assert info.value.code == "unknown_request_id"
    assert not list((tmp_path / MODEL / samples.INDEX).rglob("*.json"))


def test_age_limit_drops_old_shards(tmp_path):
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "old", image_batch())
    time.sleep(0.05)
    boundary = time.time()
    time.sleep(0.5)
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "new", image_batch())
    # An age limit that puts the boundary between the two captures (robust to a slow disk).
    SampleStore(tmp_path, max_age_seconds=time.time() - boundary).enforce_limits(MODEL)
    assert [s.request_id for s in iter_samples(tmp_path, MODEL)] == ["new"]
    with pytest.raises(ExpiredRequestError):
        record_feedback(tmp_path, "old", ["x"])


# -- several processes ----------------------------------------------------------------


def _writer(root: str, worker: int, count: int, max_bytes: int) -> None:
    store = SampleStore(root, rate=1.0, max_bytes=max_bytes)
    for i in range(count):
        store.capture(MODEL, 1, f"w{worker}-{i}", image_batch(1, float(worker)))


def test_several_writer_processes_respect_the_cap_and_never_corrupt(tmp_path):
    size = (
        SampleStore(tmp_path / "probe", rate=1.0)
        .capture(MODEL, 1, "p", image_batch())
        .stat()
        .st_size
    )
    cap = 40 * size
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "s"), w, 60, cap)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        join_or_fail(p, 120)
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
