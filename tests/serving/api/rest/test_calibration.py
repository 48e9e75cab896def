"""Name probing on ``/v1/feedback`` and the calibration admin endpoints.

Model and job names are checked before any path is built from them: path-like
names answer 400, unknown names 404, and a directory that exists outside the
model base and capture store answers exactly as one that does not (no oracle).
"""

from __future__ import annotations

import pytest

from serving.app import create_app
from tests.helpers import tiny_models
from tests.helpers.gateway import settings_for
from tests.helpers.problems import assert_problem

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def probed(mutable_repo, tmp_path):
    """An app with capture and admin enabled, and a sentinel model-like tree beside the base.

    ``sentinel/1/assets.extra/model_card.json`` is not JSON: had the gateway joined
    a probed name to the model base and read it, the answer would be a 500 or 422.
    """
    card = tmp_path / "sentinel" / "1" / "assets.extra" / "model_card.json"
    card.parent.mkdir(parents=True)
    card.write_text("not a model card")
    state = tmp_path / "state"
    settings = settings_for(
        "embedded",
        mutable_repo,
        capture_dir=str(tmp_path / "samples"),
        state_dir=str(state),
        admin_token=TOKEN,
    )
    app = create_app(settings)
    yield app, tmp_path
    app.extensions["imgserve"].close()


def path_like(tmp_path):
    """Names that must never reach the file system: (name, expected status)."""
    return [
        ("/proc", 400),
        ("../sentinel", 400),
        (str(tmp_path / "sentinel"), 400),
        ("../does-not-exist", 400),
        (f"{tiny_models.CLASSIFIER}/../../sentinel", 400),
        ("..", 400),
        (".", 400),
        ("tiny\x00classifier", 400),
        ("..\\sentinel", 400),
        ("sentinel", 404),  # a safe name, but not a served model
        ("x" * 500, 400),
    ]


def _jobs(tmp_path) -> list:
    jobs = tmp_path / "state"
    return sorted(p.name for p in jobs.rglob("*.json")) if jobs.exists() else []


def test_feedback_names_are_checked_before_the_file_system(probed):
    app, tmp_path = probed
    client = app.test_client()
    for name, status in path_like(tmp_path):
        body = {"request_id": "req-0", "labels": [0], "model": name}
        doc = assert_problem(client.post("/v1/feedback", json=body), status)
        assert doc["code"] == ("invalid_parameter" if status == 400 else "model_not_found")
    # An existing directory outside the base and a missing one answer alike.
    exists = client.post(
        "/v1/feedback", json={"request_id": "r", "labels": [0], "model": "../sentinel"}
    )
    missing = client.post(
        "/v1/feedback", json={"request_id": "r", "labels": [0], "model": "../nope"}
    )
    assert exists.status_code == missing.status_code == 400
    assert exists.get_json()["code"] == missing.get_json()["code"]
    # A model name that is not a string is a 400, as before.
    assert_problem(
        client.post("/v1/feedback", json={"request_id": "r", "labels": [0], "model": 3}), 400
    )


def test_admin_calibration_names_are_checked_before_the_file_system(probed):
    app, tmp_path = probed
    client = app.test_client()
    before = _jobs(tmp_path)
    for name, status in path_like(tmp_path):
        r = client.post("/v1/admin/calibrations", json={"model": name}, headers=AUTH)
        assert_problem(r, status)
    assert _jobs(tmp_path) == before, "a job was started for a probed name"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ('"min_samples": 0', "min_samples"),
        ('"min_samples": 2.5', "min_samples"),
        ('"min_samples": "many"', "min_samples"),
        ('"min_samples": 1e400', "min_samples"),  # inf to Python's json: was a 500
        ('"prior_strength": -1', "prior_strength"),
        ('"prior_strength": NaN', "prior_strength"),  # passed "< 0" and started a job
        ('"prior_strength": 1e400', "prior_strength"),
        ('"prior_strength": true', "prior_strength"),
    ],
)
def test_calibration_options_no_run_can_use_are_a_400_and_start_nothing(probed, options, field):
    app, tmp_path = probed
    before = _jobs(tmp_path)
    body = f'{{"model": "{tiny_models.CLASSIFIER}", {options}}}'
    r = app.test_client().post(
        "/v1/admin/calibrations", data=body, content_type="application/json", headers=AUTH
    )
    doc = assert_problem(r, 400)
    assert field in doc["detail"], doc
    assert _jobs(tmp_path) == before, "a job was started with an option no run can use"


@pytest.mark.parametrize("job_id", ["..", ".", "..%00", "%00", "a%00b", "..json", "x" * 300])
def test_job_ids_are_never_paths(probed, job_id):
    app, _ = probed
    r = app.test_client().get(f"/v1/admin/calibrations/{job_id}", headers=AUTH)
    assert_problem(r, 404, "not_found")


def test_served_model_still_reaches_the_store(probed):
    # The check lets the real model through: an unknown request id is the store's 404.
    app, _ = probed
    body = {"request_id": "never-captured", "labels": [0], "model": tiny_models.CLASSIFIER}
    assert_problem(app.test_client().post("/v1/feedback", json=body), 404, "not_found")
