"""``imgserve feedback REQUEST_ID LABEL...`` or ``--objects FILE``: ground truth for a
captured request, over REST (``POST /v1/feedback``) or gRPC (``ImageService/Feedback``).

LABELs are class names, one per image of the request, in its order. ``--objects`` reads
a JSON file (``-``: standard input) holding, per image of a detect request, a list of
``{"label": name or index, "box": [ymin, xmin, ymax, xmax]}`` in the original image's
pixels: what ``imgserve detect --json`` answered, corrected, is taken as it is (the
``predictions``' ``detections`` are read, their boxes in the answer's form). Exit codes
as ``imgserve classify``'s: 0 recorded (or the same feedback again), 1 refused (an
unknown id, a label the model does not have, different feedback recorded before...),
2 usage, 3 server failure, 4 no server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from imgserve.client import ClientError
from imgserve.predict import EXIT_USAGE, add_connection_arguments, connect


def add_feedback_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imgserve feedback``."""
    parser.add_argument("request_id", metavar="REQUEST_ID", help="the captured request's id")
    parser.add_argument(
        "labels", nargs="*", metavar="LABEL", help="class names, one per image of the request"
    )
    parser.add_argument(
        "--objects",
        metavar="FILE",
        help="JSON: per image, a list of {label, box} in original pixels ('-': stdin); "
        "or the JSON answer of 'imgserve detect --json'",
    )
    add_connection_arguments(parser)
    parser.add_argument("--model", help="the model that answered (default: found by the id)")
    parser.set_defaults(func=run_feedback)


def read_objects(source: str) -> list[Any]:
    """Per-image object lists from ``source`` (a path, or ``-``); ValueError if unreadable."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {source}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("predictions"), list):
        # A detect answer: its detections are the objects (score and index are ignored).
        return [
            list(p.get("detections", [])) if isinstance(p, dict) else p for p in doc["predictions"]
        ]
    return doc


def run_feedback(args: argparse.Namespace) -> int:
    """Send the feedback; print what was recorded."""
    if bool(args.labels) == (args.objects is not None):
        return _usage("give either LABELs (one per image) or --objects FILE, not both")
    objects = None
    if args.objects is not None:
        try:
            objects = read_objects(args.objects)
        except ValueError as exc:
            return _usage(exc)
    client = connect(args)
    try:
        answer = client.feedback(
            args.request_id, labels=args.labels or None, objects=objects, model=args.model
        )
    except ClientError as exc:
        print(f"imgserve feedback: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        client.close()
    if args.json:
        print(json.dumps(answer, indent=1))
    else:
        print(feedback_text(answer))
    return 0


def feedback_text(answer: dict[str, Any]) -> str:
    """What was recorded, a line per image (objects: label and box in original pixels)."""
    what = "recorded" if answer["created"] else "already recorded (the same feedback)"
    lines = [f"request {answer['request_id']} model {answer['model']}: {what}"]
    if "objects" in answer:
        for i, objs in enumerate(answer["objects"]):
            boxes = ", ".join(f"{o['label']} {[round(v, 1) for v in o['box']]}" for o in objs)
            lines.append(f"image {i}: {boxes or '(no objects)'}")
    else:
        lines += [f"image {i}: {label}" for i, label in enumerate(answer["labels"])]
    return "\n".join(lines)


def _usage(message: object) -> int:
    print(f"imgserve feedback: error: {message}", file=sys.stderr)
    return EXIT_USAGE
