"""Drift, capture, feedback and calibration jobs through the gateway; a real Prometheus."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from contract.model_card import MODEL_CARD_RELPATH
from serving.app import create_app
from serving.observers.auto_trigger import in_alarm
from tests.deploy import promql
from tests.helpers import dashboards, tiny_models
from tests.helpers.gateway import settings_for
from tests.helpers.metrics_text import parse, value
from tests.helpers.servers import free_port, gunicorn, stop, wait_for
from training.classifier import REFERENCE_SET

TOKEN = "test-admin-token"


def _reference_pngs(repo: Path, *, invert: bool = False) -> list[bytes]:
    ref = np.load(repo / tiny_models.CLASSIFIER / "1" / "assets.extra" / REFERENCE_SET)
    out = []
    for px in ref["pixels"]:
        img = 255 - px if invert else px
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _capture_settings(repo: Path, tmp: Path, **extra):
    """Embedded backend capturing every request, with its own state directory."""
    return settings_for(
        "embedded",
        repo,
        capture_dir=str(tmp / "samples"),
        capture_rate=1.0,
        state_dir=str(tmp / "state"),
        **extra,
    )


@pytest.fixture
def capture_app(mutable_repo, tmp_path):
    app = create_app(_capture_settings(mutable_repo, tmp_path, admin_token=TOKEN))
    yield app
    app.extensions["imgserve"].close()


def _classify(client, png: bytes, request_id: str):
    r = client.post(
        f"/v1/classify?model={tiny_models.CLASSIFIER}",
        data=png,
        headers={"Content-Type": "image/png", "X-Request-ID": request_id},
    )
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_capture_feedback_and_monitoring_metrics(capture_app, mutable_repo):
    client = capture_app.test_client()
    pngs = _reference_pngs(mutable_repo)[:3]
    for i, png in enumerate(pngs):
        _classify(client, png, f"req-{i}")
    capture_app.extensions["imgserve.monitoring"].capture.flush()
    labels = (
        capture_app.extensions["imgserve"].catalog.version(tiny_models.CLASSIFIER, 1).class_labels
    )

    r = client.post("/v1/feedback", json={"request_id": "req-0", "labels": [labels[0]]})
    assert r.status_code == 201 and r.get_json()["created"] is True
    assert (
        client.post("/v1/feedback", json={"request_id": "req-0", "labels": [labels[0]]}).status_code
        == 200
    )
    conflict = client.post("/v1/feedback", json={"request_id": "req-0", "labels": [labels[1]]})
    assert conflict.status_code == 409 and conflict.content_type == "application/problem+json"
    assert (
        client.post("/v1/feedback", json={"request_id": "nope", "labels": [0]}).status_code == 404
    )
    bad = client.post(
        "/v1/feedback",
        json={"request_id": "req-1", "labels": ["no-such-class"], "model": tiny_models.CLASSIFIER},
    )
    assert bad.status_code == 422
    assert (
        client.post("/v1/feedback", data=b"x", headers={"Content-Type": "text/plain"}).status_code
        == 400
    )

    families = parse(client.get("/metrics").get_data(as_text=True))
    m = tiny_models.CLASSIFIER
    assert value(families, "imgserve_capture_samples_total", model=m) == 3
    assert value(families, "imgserve_predictions_total", model=m) == 3
    assert value(families, "imgserve_prediction_confidence_count", model=m) == 3
    assert value(families, "imgserve_drift_window_images", model=m, version="1") == 3
    assert value(families, "imgserve_model_temperature", model=m, version="1") == 1.0
    scores = [s for s in families["imgserve_drift_score"] if s.labels["model"] == m]
    assert {s.labels["score"] for s in scores} == {"mean_shift", "sym_kl"}
    assert len({s.labels["layer"] for s in scores}) == 3


def test_admin_endpoints_need_the_token(capture_app):
    client = capture_app.test_client()
    body = {"model": tiny_models.CLASSIFIER}
    assert client.post("/v1/admin/calibrations", json=body).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert client.post("/v1/admin/calibrations", json=body, headers=wrong).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (
        client.post("/v1/admin/calibrations", json={"model": "nope"}, headers=auth).status_code
        == 404
    )
    assert client.get("/v1/admin/calibrations/does-not-exist", headers=auth).status_code == 404


@pytest.mark.slow
def test_calibration_job_runs_outside_the_worker_and_is_reported(capture_app, mutable_repo):
    client = capture_app.test_client()
    pngs = _reference_pngs(mutable_repo, invert=True)
    for i, png in enumerate(pngs):
        _classify(client, png, f"cal-{i}")
    capture_app.extensions["imgserve.monitoring"].capture.flush()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post(
        "/v1/admin/calibrations",
        headers=auth,
        json={"model": tiny_models.CLASSIFIER, "min_samples": 16},
    )
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    import os

    assert job["pid"] != os.getpid()
    busy = client.post(
        "/v1/admin/calibrations", headers=auth, json={"model": tiny_models.CLASSIFIER}
    )
    assert busy.status_code == 409
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/v1/admin/calibrations/{job['id']}", headers=auth).get_json()
        if job["status"] != "running":
            break
        time.sleep(1)
    assert job["status"] in ("published", "rejected", "insufficient_samples"), job
    families = parse(client.get("/metrics").get_data(as_text=True))
    assert (
        value(
            families,
            "imgserve_calibration_runs_total",
            model=tiny_models.CLASSIFIER,
            outcome=job["status"],
        )
        == 1
    )


@pytest.mark.slow
def test_sustained_drift_starts_one_calibration_job_then_cools_down(mutable_repo, tmp_path):
    """Clean traffic starts nothing; inverted traffic for longer than the sustain time
    starts exactly one job (trigger ``drift``); the cool-down holds after it ends."""
    card = json.loads(
        (mutable_repo / tiny_models.CLASSIFIER / "1" / MODEL_CARD_RELPATH).read_text()
    )
    window = card["bn_reference"]["drift"]["window"]  # the thresholds' window
    app = create_app(
        _capture_settings(
            mutable_repo,
            tmp_path,
            auto_calibrate_after_s=1.0,
            auto_calibrate_check_s=0.1,
            auto_calibrate_cooldown_s=3600,
            drift_window=window,
        )
    )
    try:
        client = app.test_client()
        monitoring = app.extensions["imgserve.monitoring"]
        key = (tiny_models.CLASSIFIER, 1)
        clean = _reference_pngs(mutable_repo)
        for i in range(2 * window):
            _classify(client, clean[i % len(clean)], f"clean-{i}")
        assert not in_alarm(monitoring.drift.scores()[key], window)
        time.sleep(2.0)  # twice the sustain time, 20 checks
        assert monitoring.jobs.jobs() == []

        inverted = _reference_pngs(mutable_repo, invert=True)
        for i in range(2 * window):
            _classify(client, inverted[i % len(inverted)], f"shifted-{i}")
        assert in_alarm(monitoring.drift.scores()[key], window)
        assert wait_for(lambda: monitoring.jobs.jobs(), timeout=30), "no job was started"
        (job,) = monitoring.jobs.jobs()
        assert job["trigger"] == "drift" and job["model"] == tiny_models.CLASSIFIER
        assert "mean_shift" in job["reason"] or "sym_kl" in job["reason"]
        assert wait_for(lambda: monitoring.jobs.get(job["id"])["status"] != "running", 300)
        # Still drifting on version 1 if the gate refused; either way, no second job.
        for i in range(window):
            _classify(client, inverted[i % len(inverted)], f"again-{i}")
        time.sleep(2.0)
        assert [j["id"] for j in monitoring.jobs.jobs()] == [job["id"]]
        assert monitoring.jobs.get(job["id"])["status"] in (
            "published",
            "rejected",
            "insufficient_samples",
        )
    finally:
        app.extensions["imgserve"].close()


def _prometheus(tmp: Path, target: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: apt-get install -y prometheus"
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "imgserve", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(tmp / "prometheus.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _query(url: str, expr: str) -> list[dict]:
    r = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _wait_for(url: str, expr: str, timeout: float = 60) -> list[dict]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            result = _query(url, expr)
            if result:
                return result
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never returned data for {expr!r}")


@pytest.mark.slow
def test_prometheus_reads_the_drift_alarm_after_shifted_traffic(serving_repo, tmp_path):
    """Real gunicorn scraped by a real Prometheus: clean, then noise traffic.

    One worker, so every request lands in the same window (pooling across workers,
    where an idle worker's older window also counts, is tested in observers/test_drift.py).
    """
    repo = tmp_path / "models"
    shutil.copytree(serving_repo, repo, ignore=shutil.ignore_patterns(".lock"))
    card_window = 16
    proc, url, log = gunicorn(
        repo,
        tmp_path,
        workers="1",
        threads="8",
        drift_window=str(card_window),
        state_dir=str(tmp_path / "state"),
        capture_dir=str(tmp_path / "samples"),
        capture_rate="0.5",
    )
    prom, prom_url = _prometheus(tmp_path, url.removeprefix("http://"))
    try:
        m = tiny_models.CLASSIFIER
        above = (
            f'imgserve_drift_score{{model="{m}"}} > on(model,version,layer,score) '
            f'imgserve_drift_threshold{{model="{m}"}}'
        )
        clean = _reference_pngs(repo)
        for png in clean:
            r = requests.post(
                f"{url}/v1/classify?model={m}",
                data=png,
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            assert r.status_code == 200
        _wait_for(prom_url, f'imgserve_drift_window_images{{model="{m}"}} > 0')
        clean_scores = _wait_for(prom_url, f'imgserve_drift_score{{model="{m}"}}')
        assert len(clean_scores) == 6  # 3 probe layers x 2 scores
        # Shifted traffic: uniform noise images, more than every worker's window holds.
        rng = np.random.default_rng(0)
        for _ in range(4 * card_window):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
            png = buf.getvalue()
            r = requests.post(
                f"{url}/v1/classify?model={m}",
                data=png,
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            assert r.status_code == 200
        alarms = _wait_for(prom_url, above)
        assert {a["metric"]["model"] for a in alarms} == {m}

        # Every metric the alert rules and the dashboard use exists in a real scrape
        # (or comes from elsewhere: TF Serving, kube-state-metrics, Prometheus).
        scraped = set(parse(requests.get(f"{url}/metrics", timeout=10).text))
        exported = set()
        for fam_name in scraped:
            exported |= {
                fam_name,
                f"{fam_name}_total",
                f"{fam_name}_bucket",
                f"{fam_name}_count",
                f"{fam_name}_sum",
            }
        used = set()
        for rule in dashboards.rules():
            used |= promql.metric_names(rule["expr"])
        for _, expr in dashboards.dashboard_queries(dashboards.dashboard()):
            used |= promql.metric_names(expr)
        missing = sorted(n for n in used - promql.EXTERNAL_METRICS if n not in exported)
        assert not missing, f"rules/dashboard use metrics the gateway does not export: {missing}"
    finally:
        prom.terminate()
        prom.wait(20)
        stop(proc)


def test_promotion_and_rollback_under_load_fail_no_request(mutable_repo, images):
    """The calibration path's label moves under live traffic: a candidate appears as
    ``canary``, is promoted to ``stable``, then rolled back; no request fails and every
    request is answered by the version its label pointed at."""
    from calibration.labels import promote, rollback

    app = create_app(settings_for("embedded", mutable_repo, poll_interval_s=0.2))
    name = tiny_models.CLASSIFIER
    stop_event = threading.Event()
    results: dict[str, list[tuple[int, int | None]]] = {"stable": [], "canary": []}
    canary_open = threading.Event()

    def traffic(label: str) -> None:
        client = app.test_client()
        if label == "canary":
            canary_open.wait(60)
        while not stop_event.is_set():
            r = client.post(
                f"/v1/classify?model={name}&label={label}",
                data=images["png"],
                content_type="image/png",
            )
            results[label].append((r.status_code, r.get_json().get("model", {}).get("version")))

    def answered(label: str, version: int) -> bool:
        tail = results[label][-3:]
        return len(tail) == 3 and all(v == version for _, v in tail)

    # One client per label: each sees its label's versions in causal order.
    threads = [threading.Thread(target=traffic, args=(label,)) for label in results]
    service = app.extensions["imgserve"]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: len(results["stable"]) >= 5)
        tiny_models.export_classifier(mutable_repo, seed=3, labels=("canary",))  # the candidate
        assert wait_for(lambda: service.versions_in_service().count((name, 2, ["canary"])) == 1)
        canary_open.set()
        assert wait_for(lambda: answered("canary", 2)), "canary never served v2"
        assert answered("stable", 1)
        assert promote(mutable_repo, name, 2, "stable") == 1
        assert wait_for(lambda: answered("stable", 2)), "stable never moved to v2"
        assert rollback(mutable_repo, name) == (2, 1)
        assert wait_for(lambda: answered("stable", 1)), "rollback never reached the traffic"
    finally:
        stop_event.set()
        for t in threads:
            t.join(30)
        service.close()
    failures = [r for rs in results.values() for r in rs if r[0] != 200]
    assert not failures, failures[:5]
    stable = [v for _, v in results["stable"]]
    # 1 ... 2 ... 1: the label moved forward once and back once, never flickering.
    changes = [v for i, v in enumerate(stable) if i == 0 or v != stable[i - 1]]
    assert changes == [1, 2, 1], changes
    assert {v for _, v in results["canary"]} == {2}
