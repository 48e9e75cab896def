"""Feedback joined to captured requests: first label wins, repeats are idempotent, typed errors;
box feedback is checked against the captured image and mapped into the model input."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from calibration.capture_store import (
    ExpiredRequestError,
    FeedbackConflictError,
    InvalidFeedbackError,
    SampleStore,
    UnknownRequestError,
)
from calibration.feedback import read_feedback, record_box_feedback, record_feedback
from calibration.samples import BoxLabel, iter_samples, load_samples
from contract.preprocessing import PreprocessSpec, resize
from tests.helpers.capture_store import MODEL, image_batch, join_or_fail

DETECTOR = "tiny_detector"
CLASSES = ["cat", "dog"]


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


def _detect_capture(store: SampleStore, request_id: str, sizes=((90, 200),), geometry=True):
    """Capture a detect request of images ``sizes`` (h, w), letterboxed into 64x48 inputs."""
    spec = PreprocessSpec(64, 48, geometry="letterbox", pad_value=0)
    geoms = [resize(np.zeros((h, w, 3), np.uint8), spec)[1] for h, w in sizes]
    store.capture(
        DETECTOR,
        1,
        request_id,
        np.zeros((len(sizes), 64, 48, 3), np.float32),
        geometry=geoms if geometry else None,
        task="detection",
    )
    return geoms


def test_box_feedback_is_mapped_into_the_model_input_and_read_back(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    geoms = _detect_capture(store, "boxes", sizes=((90, 200), (300, 100)))
    _detect_capture(store, "unlabelled")
    objects = [
        [
            {"label": "cat", "box": [10, 20, 80, 150], "score": 0.9},
            {"label": 1, "box": [0, 0, 5, 5]},
        ],
        [],
    ]
    first = record_box_feedback(tmp_path, "boxes", objects, allowed=CLASSES)
    assert first.created and first.model == DETECTOR and first.labels == ()
    assert [o["label"] for o in first.objects[0]] == ["cat", "dog"]  # the index became a name
    want = geoms[0].boxes_to_input(np.array([[10, 20, 80, 150], [0, 0, 5, 5]]))
    np.testing.assert_allclose([o["input_box"] for o in first.objects[0]], want)
    assert first.objects[1] == ()

    samples = load_samples(tmp_path, DETECTOR)
    assert samples.request_ids == ["boxes", "boxes", "unlabelled"]
    assert samples.box_labelled.tolist() == [True, True, False]
    assert samples.labelled.tolist() == [False, False, False]  # no image labels
    assert sorted(samples.objects[:2], key=len)[0] == () and samples.objects[2] is None
    by_index = {s.index: s.objects for s in iter_samples(tmp_path, DETECTOR) if s.objects}
    assert list(by_index) == [0]
    got = by_index[0]
    assert [b.label for b in got] == ["cat", "dog"] and all(isinstance(b, BoxLabel) for b in got)
    np.testing.assert_allclose([b.box for b in got], want)
    assert [s.request_id for s in iter_samples(tmp_path, DETECTOR, labelled=True)] == [
        "boxes",
        "boxes",
    ]


def test_box_feedback_is_idempotent_and_conflicts_on_other_boxes(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    _detect_capture(store, "r")
    _detect_capture(store, "labelled")
    objects = [[{"label": "cat", "box": [10, 20, 80, 150]}]]
    assert record_box_feedback(tmp_path, "r", objects, allowed=CLASSES).created
    again = record_box_feedback(
        tmp_path, "r", [[{"label": 0, "box": [10, 20, 80, 150]}]], allowed=CLASSES
    )
    assert not again.created and again.objects[0][0]["label"] == "cat"
    for other in (
        [[{"label": "dog", "box": [10, 20, 80, 150]}]],
        [[{"label": "cat", "box": [10, 20, 80, 151]}]],
        [[]],
    ):
        with pytest.raises(FeedbackConflictError):
            record_box_feedback(tmp_path, "r", other, allowed=CLASSES)
    with pytest.raises(FeedbackConflictError, match="box feedback"):
        record_feedback(tmp_path, "r", ["cat"])
    record_feedback(tmp_path, "labelled", ["cat"])
    with pytest.raises(FeedbackConflictError, match="image labels"):
        record_box_feedback(tmp_path, "labelled", objects)
    assert read_feedback(tmp_path / DETECTOR, "r") is None  # boxes are no image labels


def test_box_feedback_errors(tmp_path):
    store = SampleStore(tmp_path, rate=1.0)
    _detect_capture(store, "r")  # 200 wide, 90 high
    _detect_capture(store, "tensor", geometry=False)
    store.capture(DETECTOR, 1, "old", image_batch())  # an older shard: no task, no geometry
    store.capture(MODEL, 1, "classify", image_batch(), geometry=[_geom()], task="classification")

    def invalid(objects, match, request_id="r", allowed=CLASSES):
        with pytest.raises(InvalidFeedbackError, match=match) as err:
            record_box_feedback(tmp_path, request_id, objects, allowed=allowed)
        assert err.value.code == "invalid_feedback"

    box = [10, 20, 80, 150]
    invalid([], "one list of objects per image")
    invalid("cat", "one list of objects per image")
    invalid([[{"label": "cat", "box": box}]] * 2, "1 image")
    invalid([{"label": "cat", "box": box}], r"objects\[0\] must be a list")
    invalid([[{"label": "cat"}]], "'label' and 'box'")
    for bad in (
        [1, 2, 3],
        [1, 2, 3, "4"],
        [1, 2, 3, float("nan")],
        [1, 2, 3, float("inf")],
        "abcd",
        [1, 2, 3, True],
        [1, 2, 3, 10**400],  # JSON integers have no limit; float() of this overflows
    ):
        invalid([[{"label": "cat", "box": bad}]], "4 finite numbers")
    invalid([[{"label": "cat", "box": [80, 20, 10, 150]}]], "empty")
    invalid([[{"label": "cat", "box": [10, 150, 80, 150]}]], "empty")
    invalid([[{"label": "cat", "box": [10, 20, 91, 150]}]], "outside the 200x90")
    invalid([[{"label": "cat", "box": [-1, 20, 80, 150]}]], "outside")
    invalid([[{"label": "cat", "box": [10, 20, 80, 201]}]], "outside")
    invalid([[{"label": "cat", "box": [90.2, 20, 90.4, 150]}]], "no area inside")
    invalid([[{"label": "cow", "box": box}]], "unknown label 'cow'")
    invalid([[{"label": 2, "box": box}]], "out of range")
    invalid([[{"label": -1, "box": box}]], "out of range")
    invalid([[{"label": None, "box": box}]], "class name or index")
    invalid([[{"label": 0, "box": box}]], "index", allowed=None)
    invalid([[{"label": "cat", "box": box}]], "classification", request_id="classify")
    invalid([[{"label": "cat", "box": box}]], "without image geometry", request_id="tensor")
    invalid([[{"label": "cat", "box": box}]], "without image geometry", request_id="old")
    with pytest.raises(UnknownRequestError):
        record_box_feedback(tmp_path, "never", [[]])
    # NumPy values (a calibration bench's own boxes) are taken as their numbers.
    _detect_capture(store, "numpy")
    arr = record_box_feedback(
        tmp_path,
        "numpy",
        [[{"label": np.int64(1), "box": np.array([10, 20, 80, 150], np.float32)}]],
        allowed=CLASSES,
    )
    assert arr.objects[0][0]["label"] == "dog" and arr.objects[0][0]["box"] == box
    # Within half a pixel of the border the box is clipped to it.
    r = record_box_feedback(
        tmp_path, "r", [[{"label": "cat", "box": [-0.5, -0.4, 90.5, 200.3]}]], allowed=CLASSES
    )
    assert r.objects[0][0]["box"] == [0.0, 0.0, 90.0, 200.0]


def test_box_feedback_on_a_dropped_sample_is_expired(tmp_path):
    store = SampleStore(tmp_path, rate=1.0, max_bytes=1)
    _detect_capture(store, "first")  # evicted at once: over the cap
    with pytest.raises(ExpiredRequestError) as err:
        record_box_feedback(tmp_path, "first", [[]])
    assert err.value.code == "expired_request_id"


def _geom():
    return resize(np.zeros((8, 8, 3), np.uint8), PreprocessSpec(8, 8))[1]
