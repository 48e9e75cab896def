"""The peer bench's parts that need no peer: locks, peer configs, request bodies, the
peers' preprocessing against the contract's, the answer reader, the table, the client.

No virtualenv is made and no server is started here: ``make bench-peers`` does that.
"""

from __future__ import annotations

import base64
import dataclasses
import email.parser
import email.policy
import io
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from bench import gateway_bench
from bench.peer_bench import photo_jpeg
from bench.peers import bodies, common, profiling, report
from contract.preprocessing import PreprocessSpec, preprocess_bytes

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers"
PEER_DIRS = sorted(p.parent for p in PEERS.glob("*/peer.json"))
LOCKS = sorted(PEERS.glob("*/requirements.txt"))
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo_classifier" / "1"
PLACEHOLDERS = {"python", "port", "model_dir", "peer_dir", "workers"}


def test_there_are_peers_and_locks():
    assert {p.name for p in PEER_DIRS} >= {"flask", "litserve"}
    assert {p.parent.name for p in LOCKS} >= {p.name for p in PEER_DIRS} | {"tools"}


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.parent.name)
def test_every_requirement_is_pinned(lock):
    lines = [ln.strip() for ln in lock.read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert reqs
    loose = [ln for ln in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+\-]+", ln)]
    assert not loose, f"{lock}: not pinned with ==: {loose}"
    requested = lock.with_name("requirements.in")
    if requested.exists():  # the top-level pins are in the lock, at the same versions
        locked = dict(pin(ln) for ln in reqs)
        for ln in requested.read_text().split():
            name, version = pin(ln)
            assert locked.get(name) == version, f"{lock}: {ln} is locked at {locked.get(name)}"


def pin(line: str) -> tuple[str, str]:
    """(normalised name, version) of ``name==version`` (PEP 503: ``Foo_Bar`` is ``foo-bar``)."""
    name, _, version = line.partition("==")
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower(), version


@pytest.mark.parametrize("peer_dir", PEER_DIRS, ids=lambda p: p.name)
def test_peer_json_has_what_the_runner_reads(peer_dir):
    cfg = json.loads((peer_dir / "peer.json").read_text())
    assert cfg["name"] == peer_dir.name
    assert cfg["doc"] and cfg["workers"] >= 1 and cfg["startup_seconds"] > 0
    assert cfg["ready"]["path"].startswith("/")
    assert (peer_dir / cfg.get("cwd", ".")).is_dir()
    used = set()
    for part in [*cfg["command"], *cfg.get("env", {}).values()]:
        used |= set(re.findall(r"{(\w+)}", part))
    assert used <= PLACEHOLDERS and {"port", "python"} <= used
    assert set(cfg["forms"]) == {"raw", "multipart"}
    taken = [f for f in cfg["forms"].values() if f is not None]
    assert taken, "a peer must take at least one form"
    for form in taken:
        assert form["path"].startswith("/")
        assert form["body"] in bodies.BUILDERS or (
            form["body"] == "custom" and (peer_dir / "body.py").is_file()
        )


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real photo as a phone stores it: sideways, EXIF orientation 6."""
    return photo_jpeg(640, 480, phone=True)


def test_the_phone_photo_is_upright_after_its_exif_tag(photo):
    img = Image.open(io.BytesIO(photo))
    assert img.getexif()[0x0112] == 6 and img.size == (480, 640)
    assert ImageOps.exif_transpose(img).size == (640, 480)


def test_multipart_body_parses_back(photo):
    _, ctype, body, headers = bodies.build_body("multipart", photo, {"field": "upload"})
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body
    )
    parts = list(msg.iter_parts())
    assert len(parts) == 1 and headers == {}
    assert parts[0].get_param("name", header="content-disposition") == "upload"
    assert parts[0].get_filename() == "x.jpg"
    assert parts[0].get_content_type() == "image/jpeg"
    assert parts[0].get_payload(decode=True) == photo


def test_json_bodies_carry_the_file(photo):
    _, ctype, body, _ = bodies.build_body("json-b64", photo, {"field": "image"})
    assert ctype == "application/json"
    assert base64.b64decode(json.loads(body)["image"]) == photo
    _, _, body, _ = bodies.build_body("kserve-v1-b64", photo, {})
    assert base64.b64decode(json.loads(body)["instances"][0]["image_bytes"]["b64"]) == photo
    _, _, body, _ = bodies.build_body("oip-json-b64", photo, {"input_name": "img"})
    tensor = json.loads(body)["inputs"][0]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("img", "BYTES", [1])
    assert base64.b64decode(tensor["data"][0]) == photo


def test_oip_binary_header_length_and_element(photo):
    _, ctype, body, headers = bodies.build_body("oip-binary", photo, {})
    n = int(headers["Inference-Header-Content-Length"])
    header, raw = json.loads(body[:n]), body[n:]
    tensor = header["inputs"][0]
    assert ctype == "application/octet-stream" and tensor["name"] == "input"
    assert tensor["parameters"]["binary_data_size"] == len(raw)
    assert int.from_bytes(raw[:4], "little") == len(photo) and raw[4:] == photo


def test_custom_and_unknown_bodies(tmp_path, photo):
    (tmp_path / "body.py").write_text(
        "def build(image):\n    return 'application/x-test', image[::-1], {'X-Test': '1'}\n"
    )
    assert bodies.build_body("custom", photo, {}, tmp_path) == (
        "",
        "application/x-test",
        photo[::-1],
        {"X-Test": "1"},
    )
    with pytest.raises(ValueError, match="unknown body kind"):
        bodies.build_body("protobuf", photo, {})


@pytest.mark.parametrize("geometry", ["stretch", "letterbox"])
@pytest.mark.parametrize("size", [(640, 480), (96, 64), (300, 900)])
def test_peer_preprocessing_is_the_contract_with_a_full_decode(geometry, size):
    """The peers feed the model what imgserve's preprocessing would with a full decode."""
    card = common.read_card(DEMO)
    card["preprocessing"]["geometry"] = geometry
    spec = dataclasses.replace(
        PreprocessSpec.from_dict(card["preprocessing"]), decode_oversample=None
    )
    data = photo_jpeg(*size, phone=True)
    expected, _ = preprocess_bytes(data, spec)
    got = common.preprocess(data, card)
    assert got.dtype == np.float32 and got.shape == (spec.height, spec.width, 3)
    np.testing.assert_array_equal(got, expected)


def test_peer_preprocessing_follows_the_card():
    """Another filter, pad value and normalisation in the card change the peers' input."""
    card = common.read_card(DEMO)
    data = photo_jpeg(300, 900)
    base = common.preprocess(data, card)
    card["preprocessing"].update(geometry="letterbox", pad_value=255, scale=1 / 255, offset=0.0)
    other = common.preprocess(data, card)
    assert other.min() >= 0 and other[:, 0].max() == other[:, 0].min() == 1.0
    assert not np.array_equal(base, other)


def test_answer_is_top_k_best_first():
    out = common.answer(np.array([0.1, 0.7, 0.2]), ["a", "b", "c"], k=2)
    assert out == {"predictions": [{"label": "b", "score": 0.7}, {"label": "c", "score": 0.2}]}


def test_top1_label_reads_each_answer_shape():
    imgserve = {
        "request_id": "r",
        "model": {"name": "m", "labels": ["x"]},
        "predictions": [{"classes": [{"label": "star", "index": 5, "score": 0.9}]}],
    }
    assert report.top1_label(imgserve) == "star"
    assert report.top1_label(common.answer(np.array([0.2, 0.8]), ["a", "b"])) == "b"
    oip = {
        "outputs": [
            {
                "name": "output",
                "datatype": "BYTES",
                "data": [json.dumps({"predictions": [{"label": "ring", "score": 0.5}]})],
            }
        ]
    }
    assert report.top1_label(oip) == "ring"
    assert report.top1_label({"error": "bad image"}) is None


def rows() -> list[report.Row]:
    r = report.Row
    return [
        r("imgserve", "model", "raw", 1, images_per_s=300.0, raw_before=900, raw_after=1000),
        r("flask", "model", "raw", 1, images_per_s=50.0, raw_before=900, raw_after=1000),
        r("litserve", "model", "raw", 1, images_per_s=400.0, raw_before=900, raw_after=1000),
        r("imgserve", "4032x3024", "raw", 8, images_per_s=40.0),
        r("litserve", "4032x3024", "raw", 8, images_per_s=25.0),
        r("flask", "4032x3024", "raw", 8, status="answer differs: 200 'ring' (imgserve 'star')"),
        r("litserve", "model", "multipart", 1, images_per_s=10.0),  # no imgserve row: no ratio
    ]


def test_ratios_compare_the_same_cell_only():
    assert report.ratios(rows()) == {
        ("flask", "model", "raw", 1): 6.0,
        ("litserve", "model", "raw", 1): 0.75,
        ("litserve", "4032x3024", "raw", 8): 1.6,
    }


def test_table_and_targets_say_what_was_found():
    text = report.table(rows())
    assert "6.00x" in text and "0.75x" in text and "answer differs" in text
    assert "950" in text  # the raw limit around the row, the mean of before and after
    lines = report.targets(rows(), "4032x3024")
    assert "litserve: imgserve ahead everywhere: NO (lowest 0.75x at model raw c=1)" in lines
    assert "  >= 2x at 4032x3024: NO (lowest 1.60x)" in lines
    assert "flask: imgserve ahead everywhere: yes (lowest 6.00x at model raw c=1)" in lines
    assert "  >= 3x everywhere: yes (lowest 6.00x)" in lines


def test_the_load_client_reads_a_closing_answer_and_a_kept_alive_one():
    a, b = socket.socketpair()
    with a, b:
        b.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 503"
        )
        buf = bytearray()
        assert gateway_bench.read_response(a, buf) == (200, True)
        assert buf == b"HTTP/1.1 503"
        b.sendall(b" Busy\r\nContent-Length: 0\r\n\r\n")
        assert gateway_bench.read_response(a, buf) == (503, False)


def test_profile_stages_from_collapsed_stacks():
    collapsed = "\n".join(
        [
            "main (app.py:1);predict (keras/src/trainers/trainer.py:9);run (tensorflow/x.py:3) 6",
            "main (app.py:1);resize (PIL/Image.py:2200) 2",
            "main (app.py:1);exif_transpose (PIL/ImageOps.py:600);load (PIL/ImageFile.py:300) 1",
            "handle (gunicorn/workers/sync.py:130);parse (gunicorn/http/message.py:40) 1",
        ]
    )
    assert profiling.summarize(collapsed) == {
        "decode": 0.1,
        "resize": 0.2,
        "model": 0.6,
        "framework": 0.1,
    }
    assert profiling.summarize("") == {}


def test_json_has_no_nan_or_infinity():
    doc = {"rows": [dataclasses.asdict(r) for r in rows()], "ratio": float("inf")}
    text = json.dumps(report.jsonable(doc), allow_nan=False)
    assert json.loads(text)["rows"][0]["p50_ms"] is None and json.loads(text)["ratio"] is None
    assert json.loads(text)["rows"][0]["images_per_s"] == 300.0
