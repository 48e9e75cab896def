"""The peer bench's rows, answers and table: no servers, no load, only arithmetic.

A row is one server at one cell (image size, request form, concurrency). The ratio of
a peer's row is imgserve's images/s in the same cell over the peer's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

REFERENCE = "imgserve"


@dataclass
class Row:
    server: str
    size: str
    form: str
    concurrency: int
    images_per_s: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    requests: int = 0
    #: Raw limit (images/s) measured right before and right after the row.
    raw_before: float = float("nan")
    raw_after: float = float("nan")
    #: "ok", or why the row was not timed (install or start failure, wrong answer, no such form).
    status: str = "ok"

    @property
    def cell(self) -> tuple[str, str, int]:
        return self.size, self.form, self.concurrency


def top1_label(answer: Any) -> str | None:
    """The first ``label`` in a JSON answer, depth first; strings that hold JSON (an
    Open Inference Protocol BYTES output) are read as JSON. None when there is none."""
    if isinstance(answer, dict):
        if isinstance(answer.get("label"), str):
            return answer["label"]
        values = list(answer.values())
    elif isinstance(answer, list):
        values = answer
    elif isinstance(answer, (str, bytes)):
        try:
            return top1_label(json.loads(answer))
        except (ValueError, TypeError):
            return None
    else:
        return None
    for value in values:
        if isinstance(value, (dict, list, str, bytes)) and (label := top1_label(value)):
            return label
    return None


def ratios(rows: list[Row]) -> dict[tuple[str, str, str, int], float]:
    """(peer, size, form, concurrency) -> imgserve's images/s over the peer's, for every
    timed peer row whose cell has a timed imgserve row (same size, form, concurrency)."""
    ref = {r.cell: r.images_per_s for r in rows if r.server == REFERENCE and r.status == "ok"}
    out = {}
    for r in rows:
        if r.server == REFERENCE or r.status != "ok" or r.cell not in ref:
            continue
        out[(r.server, *r.cell)] = ref[r.cell] / r.images_per_s if r.images_per_s > 0 else math.inf
    return out


def table(rows: list[Row]) -> str:
    """One line per row, grouped by cell; ratio is imgserve's img/s over the row's."""
    ratio = ratios(rows)
    head = (
        f"{'size':>9s} {'form':9s} {'conc':>4s} {'server':9s} {'img/s':>8s} {'p50 ms':>8s} "
        f"{'p99 ms':>8s} {'errors':>6s} {'imgserve/x':>10s} {'raw around':>10s}"
    )
    lines = [head]
    for r in rows:
        key = (r.server, *r.cell)
        if r.status != "ok":
            lines.append(f"{r.size:>9s} {r.form:9s} {r.concurrency:4d} {r.server:9s} {r.status}")
            continue
        rat = f"{ratio[key]:9.2f}x" if key in ratio else ""
        raw = (r.raw_before + r.raw_after) / 2
        lines.append(
            f"{r.size:>9s} {r.form:9s} {r.concurrency:4d} {r.server:9s} {r.images_per_s:8.1f} "
            f"{r.p50_ms:8.1f} {r.p99_ms:8.1f} {r.errors:6d} {rat:>10s} {raw:10.0f}"
        )
    return "\n".join(lines)


def targets(rows: list[Row], largest: str) -> list[str]:
    """The judged targets, each as a line with the worst ratio found: imgserve ahead of
    every peer everywhere, >= 2x every peer at the ``largest`` size, >= 3x Flask."""
    ratio = ratios(rows)
    lines = []
    for peer in sorted({k[0] for k in ratio}):
        mine = {k: v for k, v in ratio.items() if k[0] == peer}
        worst = min(mine, key=mine.get)
        lines.append(
            f"{peer}: imgserve ahead everywhere: {'yes' if mine[worst] > 1 else 'NO'} "
            f"(lowest {mine[worst]:.2f}x at {worst[1]} {worst[2]} c={worst[3]})"
        )
        big = [v for k, v in mine.items() if k[1] == largest]
        if big:
            lines.append(
                f"  >= 2x at {largest}: {'yes' if min(big) >= 2 else 'NO'} (lowest {min(big):.2f}x)"
            )
        if peer == "flask":
            lines.append(
                f"  >= 3x everywhere: {'yes' if mine[worst] >= 3 else 'NO'} (lowest {mine[worst]:.2f}x)"
            )
    return lines


def jsonable(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float as None: strict JSON (a row that timed
    nothing has no p50; a peer that answered nothing has no finite ratio)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
