"""Feedback joined to captured requests: first label wins, repeats are idempotent, typed errors."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from calibration.capture_store import (
    FeedbackConflictError,
    InvalidFeedbackError,
    SampleStore,
    UnknownRequestError,
)
from calibration.feedback import record_feedback
from calibration.samples import iter_samples, load_samples
from tests.helpers.capture_store import MODEL, image_batch, join_or_fail


def _feedback_racer(root: str, label: str, ready, go, out) -> None:
    ready.put(label)
    if go.wait(60):  # all racers start together
        try:
            record_feedback(root, "contested", [label])
            out.put(("ok", label))
        except FeedbackConflictError:
            out.put(("conflict", label))


def test_concurrent_conflicting_feedback_has_exactly_one_winner(tmp_path):
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "contested", image_batch())
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
        join_or_fail(p)
    winner = next(s.label for s in iter_samples(tmp_path, MODEL, labelled=True))
    assert sorted(label for _, label in results) == sorted(labels)
    for status, label in results:
        assert status == ("ok" if label == winner else "conflict")


def test_feedback_joins_labels_and_is_idempotent(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    store.capture(MODEL, 1, "one", image_batch())
    store.capture(MODEL, 1, "pair", image_batch(2))
    store.capture("other_model", 1, "elsewhere", image_batch())
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
    SampleStore(tmp_path, rate=1.0).capture(MODEL, 1, "one", image_batch())
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
