"""Version labels: promote, roll back, and the history that makes rollback possible.

Every label move is appended to ``<name>/label_history.jsonl``; :func:`rollback`
walks it back to the version a label pointed at before.

Each move is TF Serving's two writes (:meth:`ModelRepository.set_labels`): serve the
version, wait until the ``readiness`` check reports it AVAILABLE, then move the
label. A version that never becomes AVAILABLE is a :class:`LabelError`, the label
stays where it was and nothing is written to the history.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from calibration.errors import LabelError
from contract.repository import (
    DEFAULT_READY_TIMEOUT_S,
    FROM_ENV,
    ModelRepository,
    ReadinessCheck,
    RepositoryError,
)


def append_history(repo: ModelRepository, name: str, record: dict[str, Any]) -> None:
    """Append one label move to ``<name>/label_history.jsonl``, durably (timestamped)."""
    path = repo.history_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **record}
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_label_history(model_base: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """Every recorded label move of ``name``, oldest first."""
    path = ModelRepository(model_base).history_path(name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def move_label(
    repo: ModelRepository, name: str, label: str, version: int, action: str, **extra: Any
) -> int | None:
    """Point ``label`` at ``version`` in models.config and record it (caller holds the lock)."""
    previous = repo.labels(name).get(label)
    _set_label(repo, name, label, version)
    append_history(
        repo,
        name,
        {"action": action, "label": label, "version": int(version), "previous": previous, **extra},
    )
    return previous


def _set_label(repo: ModelRepository, name: str, label: str, version: int) -> None:
    """The two-write move, its repository errors (timeouts included) as :class:`LabelError`."""
    try:
        repo.set_labels(name, {label: int(version)})
    except RepositoryError as exc:
        raise LabelError(str(exc)) from exc


def label_stack(history: list[dict[str, Any]], label: str, current: int | None) -> list[int]:
    """The versions ``label`` pointed at, oldest first, with rolled-back ones removed."""
    stack: list[int] = []
    for rec in history:
        if rec.get("label") != label:
            continue
        if rec["action"] == "rollback":
            if stack and stack[-1] == rec.get("previous"):
                stack.pop()
        elif rec.get("previous") is not None and (not stack or stack[-1] != rec["previous"]):
            stack.append(int(rec["previous"]))
        if not stack or stack[-1] != rec["version"]:
            stack.append(int(rec["version"]))
    # A label set outside this history (an export) is where the label points now.
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def promote(
    model_base: str | os.PathLike[str],
    name: str,
    version: int,
    label: str = "stable",
    *,
    readiness: ReadinessCheck | None | str = FROM_ENV,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> int | None:
    """Point ``label`` at a published ``version``; returns the version it pointed at before.

    ``readiness`` is the serving side's check the move waits on, at most
    ``ready_timeout_s`` (see :class:`ModelRepository`; default: from the environment).
    """
    repo = ModelRepository(model_base, readiness=readiness, ready_timeout_s=ready_timeout_s)
    with repo.lock():
        if int(version) not in repo.versions(name):
            raise LabelError(f"{name} has no published version {version}")
        return move_label(repo, name, label, int(version), "promote")


def rollback(
    model_base: str | os.PathLike[str],
    name: str,
    label: str = "stable",
    *,
    readiness: ReadinessCheck | None | str = FROM_ENV,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> tuple[int, int]:
    """Move ``label`` back to the version it pointed at before; returns (from, to).

    Repeated rollbacks walk further back through the label history; versions
    no longer on disk are skipped. The target is served again and AVAILABLE before
    the label moves back (``readiness`` as for :func:`promote`).
    """
    repo = ModelRepository(model_base, readiness=readiness, ready_timeout_s=ready_timeout_s)
    with repo.lock():
        current = repo.labels(name).get(label)
        if current is None:
            raise LabelError(f"{name} has no {label!r} label to roll back")
        stack = label_stack(read_label_history(model_base, name), label, current)
        on_disk = set(repo.versions(name))
        candidates = [v for v in stack[:-1] if v in on_disk and v != current]
        if not candidates:
            raise LabelError(f"{name}: no earlier {label!r} version to roll back to")
        target = candidates[-1]
        _set_label(repo, name, label, target)
        append_history(
            repo,
            name,
            {"action": "rollback", "label": label, "version": target, "previous": current},
        )
        return current, target
