"""The gateway's drift monitor: windows, pooling across worker processes, metrics."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from contract import drift_scores
from serving.observers.drift import DriftCollector, DriftMonitor
from serving.observers.prediction_mix import PredictionMix

CHANNELS = 6


def _card() -> dict[str, Any]:
    probes = [
        {
            "name": "early",
            "channels": 2,
            "offset": 0,
            "moving_mean": [0.0, 0.0],
            "moving_variance": [1.0, 1.0],
            "epsilon": 1e-3,
        },
        {
            "name": "late",
            "channels": 4,
            "offset": 2,
            "moving_mean": [1.0] * 4,
            "moving_variance": [4.0] * 4,
            "epsilon": 1e-3,
        },
    ]
    rng = np.random.default_rng(0)
    m, s = _rows(rng, 2000, 0.0)
    ref = drift_scores.reference_quantiles(
        m,
        s,
        drift_scores.probe_references({"bn_reference": {"probes": probes}}),
        window=64,
        windows=300,
    )
    return {
        "labels": ["a", "b"],
        "bn_reference": {
            "probes": probes,
            "total_channels": 6,
            "drift": ref,
            "pixel_stats": {"mean": [0.1, 0.2, 0.3]},
        },
    }


def _rows(rng, n, shift, spatial=16):
    """Per-image probe rows of activations matching the card's stats (+ shift)."""
    early = rng.normal(0.0 + shift, 1.0, (n, spatial, 2))
    late = rng.normal(1.0 + 2 * shift, 2.0, (n, spatial, 4))
    x = np.concatenate([early, late], axis=2)
    return x.mean(1), (x**2).mean(1)


@dataclass
class _Model:
    name: str
    version: int
    card: dict
    class_labels: list = field(default_factory=lambda: ["a", "b"])


@dataclass
class _Event:
    model: _Model
    inputs: np.ndarray
    outputs: dict


def _event(card, rng, n, shift):
    m, s = _rows(rng, n, shift)
    probs = rng.dirichlet([1, 1], n)
    return _Event(
        _Model("m", 1, card),
        np.full((n, 4, 4, 3), 0.5, np.float32),
        {"bn_input_mean": m, "bn_input_sqmean": s, "probabilities": probs},
    )


def _scrape(registry):
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(generate_latest(registry).decode())
        for s in fam.samples
    }


def test_in_distribution_stays_below_and_a_shift_goes_above_the_threshold(tmp_path):
    card = _card()
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(state_dir=tmp_path, window=64)
    monitor.on_prediction(_event(card, rng, 64, 0.0))
    entry = monitor.scores()[("m", 1)]
    thr = entry["thresholds"]
    assert entry["images"] == 64
    assert all(
        entry["count"][layer][s] <= thr[layer][s] for layer in thr for s in drift_scores.SCORES
    )
    # A full window of shifted traffic replaces the clean one (count window).
    for _ in range(4):
        monitor.on_prediction(_event(card, rng, 16, 0.5))
    entry = monitor.scores()[("m", 1)]
    assert entry["images"] == 64
    assert entry["count"]["early"]["mean_shift"] > thr["early"]["mean_shift"]
    assert entry["count"]["late"]["sym_kl"] > thr["late"]["sym_kl"]
    # The decayed window still remembers the clean images, so it scores lower.
    assert entry["decayed"]["early"]["mean_shift"] < entry["count"]["early"]["mean_shift"]


def test_metrics_have_bounded_labels_and_match_the_scores(tmp_path):
    card = _card()
    registry = CollectorRegistry()
    monitor = DriftMonitor(state_dir=tmp_path, window=32)
    registry.register(DriftCollector(monitor))
    mix = PredictionMix(registry)
    rng = np.random.default_rng(2)
    event = _event(card, rng, 32, 0.0)
    monitor.on_prediction(event)
    mix.on_prediction(event)
    samples = _scrape(registry)
    score = samples[
        (
            "imgserve_drift_score",
            (("layer", "late"), ("model", "m"), ("score", "sym_kl"), ("version", "1")),
        )
    ]
    assert score == pytest.approx(monitor.scores()[("m", 1)]["count"]["late"]["sym_kl"])
    assert samples[("imgserve_drift_window_images", (("model", "m"), ("version", "1")))] == 32
    assert (
        "imgserve_drift_threshold",
        (("layer", "early"), ("model", "m"), ("score", "mean_shift"), ("version", "1")),
    ) in samples
    assert samples[
        ("imgserve_input_pixel_mean", (("channel", "g"), ("model", "m"), ("version", "1")))
    ] == pytest.approx(0.5)
    assert samples[
        (
            "imgserve_input_pixel_reference_mean",
            (("channel", "b"), ("model", "m"), ("version", "1")),
        )
    ] == pytest.approx(0.3)
    predicted = sum(v for (name, _), v in samples.items() if name == "imgserve_predictions_total")
    assert predicted == 32
    top = event.outputs["probabilities"].argmax(1)
    for k, cls in enumerate(["a", "b"]):
        key = ("imgserve_predictions_total", (("class", cls), ("model", "m")))
        assert samples.get(key, 0) == np.sum(top == k)
    confidence = event.outputs["probabilities"].max(1)
    assert samples[("imgserve_prediction_confidence_sum", (("model", "m"),))] == pytest.approx(
        confidence.sum()
    )
    assert samples[("imgserve_prediction_confidence_count", (("model", "m"),))] == 32
    # No per-channel series: the drift families carry only model/version/layer/score.
    for (name, labels), _ in samples.items():
        if name.startswith("imgserve_drift"):
            assert {k for k, _ in labels} <= {"model", "version", "layer", "score"}


def _worker(state_dir, n, shift, seed, done):
    card = _card()
    monitor = DriftMonitor(state_dir=state_dir, window=64, publish_interval_s=0.0)
    monitor.on_prediction(_event(card, np.random.default_rng(seed), n, shift))
    monitor.publish()
    done.set()
    done.wait()  # stay alive until the parent has read the files
    import time

    time.sleep(3)


def test_windows_of_several_worker_processes_are_pooled(tmp_path):
    ctx = multiprocessing.get_context("fork")
    done = ctx.Event()
    worker = ctx.Process(target=_worker, args=(tmp_path, 40, 0.5, 3, done))
    worker.start()
    try:
        assert done.wait(20)
        card = _card()
        monitor = DriftMonitor(state_dir=tmp_path, window=64)
        monitor.on_prediction(_event(card, np.random.default_rng(4), 24, 0.5))
        entry = monitor.scores()[("m", 1)]
        assert entry["images"] == 64  # 40 from the other process + 24 here
    finally:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
    # A dead worker's window no longer counts.
    entry = monitor.scores()[("m", 1)]
    assert entry["images"] == 24


def test_request_threads_only_queue_and_every_request_is_folded(tmp_path):
    """Requests from many threads at once: none is lost, and a scrape sees them all
    even when the folding thread has not run yet."""
    import threading

    card = _card()
    monitor = DriftMonitor(state_dir=tmp_path, window=512, fold_interval_s=3600.0)
    events = [_event(card, np.random.default_rng(i), 5, 0.0) for i in range(8)]
    pixels = np.arange(5 * 4 * 4 * 3, dtype=np.float32).reshape(5, 4, 4, 3) / 240.0
    for e in events:
        e.inputs = pixels
    start = threading.Barrier(8)

    def send(event) -> None:
        start.wait(10)
        for _ in range(10):
            monitor.on_prediction(event)

    threads = [threading.Thread(target=send, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (entry,) = monitor.scores().values()
    assert entry["images"] == 8 * 10 * 5
    np.testing.assert_allclose(entry["pixel_mean"], pixels.reshape(-1, 3).mean(0), rtol=1e-6)
    monitor.close()
