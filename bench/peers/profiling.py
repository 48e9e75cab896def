"""Where a server's time goes on one large photo: py-spy samples, or per-stage timing.

``py-spy record`` (from its own venv, ``.venv-peers/tools``) samples the server's
processes while a client sends one image at a time; each sampled stack is put in the
first stage it reaches from the innermost frame: ``model`` (TensorFlow, Keras),
``resize`` (Pillow's resize), ``decode`` (Pillow's open/load/convert, EXIF transpose),
else ``framework`` (HTTP parsing, routing, queues, JSON). Where py-spy cannot attach
(no ptrace permission in a container), the same stages of each server's work are
timed in this process instead, and the summary says so.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

STAGES = ("decode", "resize", "model", "framework")


def stage_of(stack: str) -> str:
    """The stage a collapsed py-spy stack (``frame;frame;...``, outermost first) belongs to."""
    for frame in reversed(stack.split(";")):
        f = frame.lower()
        if "tensorflow" in f or "keras" in f:
            return "model"
        if "resize" in f and ("pil" in f or "image" in f):
            return "resize"
        if ("pil" in f and any(w in f for w in ("load", "open", "decode", "convert", "exif"))) or (
            "exif_transpose" in f
        ):
            return "decode"
    return "framework"


def summarize(collapsed: str) -> dict[str, float]:
    """Share of samples per stage from py-spy's ``--format raw`` output."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(stack)] += int(n)
    total = sum(counts.values())
    return {s: counts[s] / total for s in STAGES} if total else {}


def record(py_spy: Path, pid: int, seconds: float, out: Path, load) -> dict:
    """Sample ``pid`` and its children for ``seconds`` while ``load()`` runs (a callable
    that drives the server and returns when done); the stage shares, or an error."""
    cmd = [str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--nonblocking"]
    cmd += ["--duration", str(int(seconds)), "--format", "raw", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # attached before the load starts
    if proc.poll() is not None:
        return {"error": (proc.stdout.read() if proc.stdout else "").strip()[-300:]}
    load()
    text, _ = proc.communicate(timeout=seconds + 60)
    if proc.returncode or not out.exists():
        return {"error": text.strip()[-300:]}
    return {"method": "py-spy record", "shares": summarize(out.read_text())}


def stage_timing(image: bytes, version_dir: Path, repeats: int = 5) -> dict:
    """Milliseconds per stage for one ``image``, timed in this process: the peers' work
    (``common``: full decode) and imgserve's (``contract.preprocessing`` with the card's
    spec, which may decode a JPEG downscaled), the model call shared by both."""
    import numpy as np

    from bench.peers import common
    from contract.model_card import read_model_card
    from contract.preprocessing import decode_image, normalize, resize

    card = common.read_card(version_dir)
    spec = read_model_card(version_dir).preprocess_spec
    predict = common.load_signature(version_dir)

    def best(fn) -> tuple[float, object]:
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3, out

    peer: dict[str, float] = {}
    peer["decode"], img = best(lambda: common.decode(image, card))
    peer["resize"], px = best(lambda: common.resize(img, card))
    x = common.normalize(px, card)[None]
    peer["model"], _ = best(lambda: predict(x))
    own: dict[str, float] = {}
    own["decode"], decoded = best(lambda: decode_image(image, spec=spec))
    own["resize"], (px2, _) = best(lambda: resize(decoded, spec))
    own["model"], _ = best(lambda: predict(normalize(px2, spec)[None].astype(np.float32)))
    return {
        "method": f"per-stage timing in the bench process (best of {repeats})",
        "peers_ms": peer,
        "imgserve_ms": own,
    }
