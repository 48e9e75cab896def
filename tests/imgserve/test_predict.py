"""``imgserve classify`` and ``imgserve detect`` against the real servers on loopback.

Both servers are started the way users start them, ``imgserve serve`` (gunicorn) and
``imgserve grpc``, on a repository of the tiny models (``tests/helpers/tiny_models.py``:
the detector's boxes and scores are known). The commands run in this process through
:func:`imgserve.cli.main`, the console script's function.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageOps

from contract.preprocessing import decode_image
from imgserve.annotate import colour_of
from imgserve.cli import main
from imgserve.client import EXIT_REFUSED, EXIT_UNREACHABLE
from imgserve.predict import EXIT_USAGE
from tests.helpers import tiny_models
from tests.helpers.capture_store import wait_captured
from tests.helpers.photos import exif_rotated_jpeg, photo
from tests.helpers.servers import (
    PYTHON,
    free_port,
    start,
    stop,
    wait_grpc_ready,
    wait_ready,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory) -> Path:
    """The capture store both servers keep every request in (for ``imgserve feedback``)."""
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, capture_dir):
    """(REST base URL, gRPC address) of ``imgserve serve`` and ``imgserve grpc``, started
    together on one repository and capture store; each must stop cleanly on SIGTERM
    (exec: the signal reaches gunicorn and the gRPC server themselves)."""
    capture = {"IMGSERVE_CAPTURE_DIR": str(capture_dir), "IMGSERVE_CAPTURE_RATE": "1"}
    tmp = tmp_path_factory.mktemp("imgserve_servers")
    base = tiny_models.build_repository(tmp / "models")
    http_port, grpc_port = free_port(), free_port()
    common = ["--model-base", str(base), "--workers", "1"]
    rest_log, grpc_log = tmp / "serve.log", tmp / "grpc.log"
    rest = start(
        [PYTHON, "-m", "imgserve", "serve", "--bind", f"127.0.0.1:{http_port}", *common],
        capture,
        rest_log,
    )
    grpc_server = start(
        [PYTHON, "-m", "imgserve", "grpc", "--bind", f"127.0.0.1:{grpc_port}", *common]
        + ["--metrics-bind", ""],
        capture,
        grpc_log,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_ready(url + "/readyz", rest, rest_log)
        wait_grpc_ready(f"127.0.0.1:{grpc_port}", grpc_server, grpc_log)
        # exec: the started process is the server, not a parent waiting on it.
        assert "gunicorn" in Path(f"/proc/{rest.pid}/cmdline").read_text()
        assert "serving.api.grpc" in Path(f"/proc/{grpc_server.pid}/cmdline").read_text()
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        # Both shut down at once (each waits for its requests in flight).
        for proc in (rest, grpc_server):
            proc.send_signal(signal.SIGTERM)
        rest_status, grpc_status = stop(rest), stop(grpc_server)
    assert rest_status == 0, rest_log.read_text()[-3000:]
    assert grpc_status == 0, grpc_log.read_text()[-3000:]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos as files: two JPEGs, one stored sideways with an EXIF orientation."""
    d = tmp_path_factory.mktemp("photos")
    files = {"chelsea": d / "chelsea.jpg", "coffee": d / "coffee.jpg", "exif": d / "exif.jpg"}
    photo("chelsea.png").convert("RGB").save(files["chelsea"], quality=92)
    photo("coffee.png").convert("RGB").save(files["coffee"], quality=92)
    files["exif"].write_bytes(exif_rotated_jpeg()[0])
    return files


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``imgserve *argv`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def top_classes(doc: dict) -> list[list[str]]:
    return [[c["label"] for c in p["classes"]] for p in doc["predictions"]]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_classify_gives_the_classes_of_a_direct_post(servers, photos, capsys, transport):
    url, grpc_address = servers
    files = [photos["chelsea"], photos["coffee"]]
    direct = requests.post(
        f"{url}/v1/classify",
        files=[("image", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
        data={"top_k": 3},
        timeout=30,
    )
    assert direct.status_code == 200, direct.text
    where = ["--url", url] if transport == "rest" else ["--grpc", grpc_address]
    code, out, err = run(capsys, "classify", *files, *where, "--top-k", 3, "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["model"] == direct.json()["model"]
    assert top_classes(answer) == top_classes(direct.json())
    assert all(len(labels) == 3 for labels in top_classes(answer))
    scores = [c["score"] for p in answer["predictions"] for c in p["classes"]]
    expected = [c["score"] for p in direct.json()["predictions"] for c in p["classes"]]
    assert scores == pytest.approx(expected, abs=1e-6)

    rid = f"table-{transport}"
    code, table, _ = run(capsys, "classify", *files, *where, "--top-k", 1, "--request-id", rid)
    assert code == 0
    lines = table.splitlines()
    assert lines[0] == f"model tiny_classifier version 1 (stable); request {rid}"
    assert lines[1].split() == ["FILE", "RANK", "LABEL", "SCORE"]
    for f, labels, line in zip(files, top_classes(answer), lines[2:], strict=True):
        assert line.split()[:3] == [str(f), "1", labels[0]]


def _check_drawn(original: bytes, drawn: Image.Image, prediction: dict) -> None:
    """The drawing is the upright original, with each box's left edge in its class colour."""
    seen = decode_image(original).image
    assert drawn.size == seen.size == (prediction["width"], prediction["height"])
    before, after = seen.load(), drawn.convert("RGB").load()
    assert prediction["detections"]
    for d in prediction["detections"]:
        box = d["box"]
        # Low on the left edge: clear of the label tag at the box's top.
        edge = (round(box["xmin"]), round(box["ymin"] + 0.75 * (box["ymax"] - box["ymin"])))
        assert after[edge] == colour_of(d["index"]) != before[edge], (d, edge)
        inside = (round((box["xmin"] + box["xmax"]) / 2), edge[1])
        assert after[inside] == before[inside], "the box's inside is left as it was"


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_detect_out_draws_the_boxes_on_the_upright_photo(
    servers, photos, capsys, tmp_path, transport
):
    url, grpc_address = servers
    where = ["--url", url] if transport == "rest" else ["--grpc", grpc_address]
    out = tmp_path / "boxes.png"
    code, _, err = run(capsys, "detect", photos["exif"], *where, "--out", out)
    assert code == 0, err
    code, text, _ = run(capsys, "detect", photos["exif"], *where, "--json")
    (prediction,) = json.loads(text)["predictions"]
    # Stored sideways (300 wide, 451 high), served and drawn upright.
    upright = ImageOps.exif_transpose(Image.open(photos["exif"])).size
    assert upright == (451, 300)
    drawn = Image.open(out)
    assert drawn.format == "PNG"
    _check_drawn(photos["exif"].read_bytes(), drawn, prediction)
    labels = {d["label"] for d in prediction["detections"]}
    assert labels == {"triangle", "circle"}  # the tiny detector's slots above 0.3


def test_detect_several_files_writes_one_image_each_into_a_directory(
    servers, photos, capsys, tmp_path
):
    url, _ = servers
    files = [photos["chelsea"], photos["coffee"]]
    code, text, err = run(capsys, "detect", *files, "--url", url, "--out", tmp_path / "drawn")
    assert code == 0, err
    rows = text.splitlines()
    assert rows[1].split() == ["FILE", "LABEL", "SCORE", "XMIN", "YMIN", "XMAX", "YMAX"]
    assert {row.split()[0] for row in rows[2:]} == {str(f) for f in files}
    code, text, _ = run(capsys, "detect", *files, "--url", url, "--json")
    for f, prediction in zip(files, json.loads(text)["predictions"], strict=True):
        _check_drawn(f.read_bytes(), Image.open(tmp_path / "drawn" / f"{f.stem}.png"), prediction)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_file_that_is_no_image_is_refused_with_the_servers_reason(
    servers, photos, capsys, tmp_path, transport
):
    url, grpc_address = servers
    where = ["--url", url] if transport == "rest" else ["--grpc", grpc_address]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    code, out, err = run(capsys, "classify", photos["chelsea"], notes, *where)
    assert code == EXIT_REFUSED
    assert out == ""
    assert "(400): image 1: bytes are not a recognised image format" in err
    if transport == "rest":  # the problem document says which image: the command names it
        assert err.rstrip().endswith(f"(FILE {notes})")
    assert "Traceback" not in err


def test_an_unknown_model_is_refused(servers, photos, capsys):
    url, _ = servers
    code, _, err = run(capsys, "classify", photos["chelsea"], "--url", url, "--model", "nope")
    assert code == EXIT_REFUSED
    assert "Model not found (404): model 'nope' is not served" in err


def test_a_missing_file_is_a_usage_error_before_any_request(capsys, tmp_path):
    # No server listens at the URL: the file is checked first.
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "classify", tmp_path / "missing.jpg", "--url", url)
    assert code == EXIT_USAGE
    assert "cannot read" in err and "missing.jpg" in err


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_an_unreachable_server_has_its_own_exit_code(photos, capsys, transport):
    port = free_port()  # nothing listens there
    where = (
        ["--url", f"http://127.0.0.1:{port}"]
        if transport == "rest"
        else ["--grpc", f"127.0.0.1:{port}"]
    )
    code, _, err = run(capsys, "detect", photos["chelsea"], *where, "--timeout", 5)
    assert code == EXIT_UNREACHABLE
    assert "no answer from" in err and str(port) in err
    assert "connection refused" in err.lower()


def test_a_url_without_a_scheme_is_a_usage_error(photos, capsys):
    code, _, err = run(capsys, "classify", photos["chelsea"], "--url", "localhost:8080")
    assert code == EXIT_USAGE
    assert "not an http(s) URL" in err


def test_an_unwritable_out_is_a_usage_error_after_the_answer(servers, photos, capsys, tmp_path):
    url, _ = servers
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory would go")
    code, out, err = run(
        capsys, "detect", photos["chelsea"], "--url", url, "--out", blocker / "b.png"
    )
    assert code == EXIT_USAGE
    assert "triangle" in out  # the answer is printed; only the drawing could not be written
    assert f"cannot write {blocker}" in err


# -- imgserve feedback ----------------------------------------------------------------
@pytest.mark.parametrize(("asked", "told"), [("rest", "grpc"), ("grpc", "rest")])
def test_feedback_joins_labels_to_a_request_made_over_either_api(
    servers, photos, capsys, capture_dir, asked, told
):
    url, grpc_address = servers
    where = {"rest": ["--url", url], "grpc": ["--grpc", grpc_address]}
    rid = f"labels-{asked}-{told}"
    files = [photos["chelsea"], photos["coffee"]]
    code, _, err = run(capsys, "classify", *files, *where[asked], "--request-id", rid)
    assert code == 0, err
    wait_captured(capture_dir, rid)
    labels = tiny_models.CLASSIFIER_LABELS
    code, out, err = run(capsys, "feedback", rid, labels[2], labels[0], *where[told])
    assert code == 0, err
    assert out.splitlines() == [
        f"request {rid} model {tiny_models.CLASSIFIER}: recorded",
        f"image 0: {labels[2]}",
        f"image 1: {labels[0]}",
    ]
    code, out, _ = run(capsys, "feedback", rid, labels[2], labels[0], *where[asked], "--json")
    assert code == 0 and json.loads(out)["created"] is False  # the same again
    code, _, err = run(capsys, "feedback", rid, labels[1], labels[1], *where[told])
    assert code == EXIT_REFUSED and "(409)" in err, err
    code, _, err = run(capsys, "feedback", rid, "no-such-class", "x", *where[told])
    assert code == EXIT_REFUSED and "no-such-class" in err, err


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_feedback_takes_a_detect_answer_back_as_its_objects(
    servers, photos, capsys, capture_dir, tmp_path, transport
):
    url, grpc_address = servers
    where = ["--url", url] if transport == "rest" else ["--grpc", grpc_address]
    rid = f"boxes-{transport}"
    code, text, err = run(capsys, "detect", photos["exif"], *where, "--json", "--request-id", rid)
    assert code == 0, err
    answer = json.loads(text)
    assert answer["request_id"] == rid
    wait_captured(capture_dir, rid)
    (detections,) = [p["detections"] for p in answer["predictions"]]
    assert detections
    saved = tmp_path / "answer.json"
    saved.write_text(text)  # what a reviewer corrects: here, taken as it is
    code, out, err = run(capsys, "feedback", rid, "--objects", saved, *where, "--json")
    assert code == 0, err
    recorded = json.loads(out)
    assert recorded["created"] is True and recorded["model"] == tiny_models.DETECTOR
    (objects,) = recorded["objects"]
    assert [o["label"] for o in objects] == [d["label"] for d in detections]
    for o, d in zip(objects, detections, strict=True):
        box = [d["box"][k] for k in ("ymin", "xmin", "ymax", "xmax")]
        assert o["box"] == pytest.approx(box, abs=1e-3)
        assert len(o["input_box"]) == 4
    code, out, _ = run(capsys, "feedback", rid, "--objects", saved, *where)
    assert code == 0 and "already recorded" in out.splitlines()[0]


def test_feedback_usage_errors_come_before_any_request(capsys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: each refusal is local
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv, words in [
        (["r1"], "either LABELs"),
        (["r1", "cat", "--objects", bad], "either LABELs"),
        (["r1", "--objects", tmp_path / "missing.json"], "cannot read"),
        (["r1", "--objects", bad], "is not JSON"),
    ]:
        code, _, err = run(capsys, "feedback", *argv, "--url", url)
        assert code == EXIT_USAGE and words in err, (argv, err)


def test_feedback_objects_the_gateway_would_refuse_are_refused_before_grpc(capsys, tmp_path):
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([[{"label": "circle", "box": [1, 2, 3]}]]))
    grpc_address = f"127.0.0.1:{free_port()}"  # never reached
    code, _, err = run(capsys, "feedback", "r1", "--objects", objects, "--grpc", grpc_address)
    assert code == EXIT_REFUSED and "objects[0][0].box must be 4 numbers" in err, err
