"""Export a candidate privately, then publish it as the next version or keep it as rejected.

A passing candidate is published atomically as version N+1 and the promote
label points at it; a failing one goes to ``<name>/rejected/<N+1>`` with
``rejection.json`` holding the reasons, and ``models.config`` is not touched.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from calibration.gate import GateCheck, gate_passed, staleness_check
from calibration.labels import move_label
from calibration.model_io import StableParent
from calibration.reestimate import Reestimation
from calibration.result import PUBLISHED, REJECTED, CalibrationResult
from calibration.temperature import TemperatureFit
from calibration.traffic import TrafficSplit
from contract import drift_scores
from contract.export import ExportResult, export_model, pixel_statistics
from contract.model_card import REQUIRED, ModelCard, write_model_card
from contract.preprocessing import PreprocessSpec

#: Card keys ``export_model`` writes itself; everything else is carried from the parent.
EXPORT_OWNED = frozenset(REQUIRED)
#: Fewest held-out images the exported drift thresholds are computed on; below it, all.
MIN_DRIFT_IMAGES = 16


@dataclass
class CandidateExport:
    """What is exported: the candidate model and the card fields it adds to the parent's."""

    model: keras.Model
    task: str
    spec: PreprocessSpec
    labels: list[str]
    postprocess: Callable
    card_fields: dict[str, Any]
    extra_files: dict[str, bytes]


@dataclass(frozen=True)
class Publication:
    """Where the candidate of ``parent`` went: published (``labels_moved``) or rejected."""

    parent: StableParent
    passed: bool
    version: int
    path: Path
    labels_moved: dict[str, int]

    def result(
        self,
        checks: list[GateCheck],
        temperature: float,
        temperature_fit: TemperatureFit | None,
        accuracy: dict[str, Any],
        samples: dict[str, Any],
        prior: tuple[float, list[dict[str, Any]]],
    ) -> CalibrationResult:
        """The run's result, with what the orchestrator measured."""
        return CalibrationResult(
            name=self.parent.name,
            status=PUBLISHED if self.passed else REJECTED,
            version=self.version,
            path=self.path,
            parent_version=self.parent.version,
            labels_moved=self.labels_moved,
            checks=checks,
            temperature=temperature,
            temperature_fit=temperature_fit,
            accuracy=accuracy,
            samples=samples,
            prior_strength=prior[0],
            prior_search=prior[1],
        )


def candidate_card_fields(
    card: ModelCard,
    *,
    metrics: dict[str, Any],
    x_fit: np.ndarray,
    calibration: dict[str, Any],
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """The candidate card's fields: the parent's (those the export does not own) and the new."""
    return {
        **{k: v for k, v in card.to_json().items() if k not in EXPORT_OWNED},
        "metrics": metrics,
        "bn_reference": {"pixel_stats": pixel_statistics(x_fit)},
        "calibration": calibration,
        "lineage": lineage,
    }


def lineage_entry(
    parent: StableParent,
    method: str,
    stats: Reestimation,
    fine_tune: dict[str, Any],
    prior: tuple[float, list[dict[str, Any]]],
    samples: dict[str, Any],
    temperature: float,
    drifted: bool,
    checks: list[GateCheck],
) -> dict[str, Any]:
    """The candidate card's ``lineage``: parent, method, prior, samples, temperature, gate.

    The gate's verdict is filled in at publication, after the staleness check.
    """
    return {
        "parent_version": parent.version,
        "method": method,
        "bn_layers_reestimated": len(stats.layers),
        "fine_tune": fine_tune,
        "prior_strength": float(prior[0]),
        "prior_search": prior[1],
        "samples": samples,
        "temperature": temperature,
        "traffic_drifted_from_parent": drifted,
        "gate": {"passed": None, "checks": [c.to_dict() for c in checks]},
    }


def export_and_publish(
    parent: StableParent,
    candidate: CandidateExport,
    x: np.ndarray,
    split: TrafficSplit,
    checks: list[GateCheck],
    *,
    promote: str,
) -> Publication:
    """Export the candidate privately, add the staleness check, then publish or reject.

    ``checks`` gets the ``statistics_converged`` check appended.
    """
    private = parent.repo.base / parent.name / f".calibrate-{secrets.token_hex(6)}"
    try:
        exported = _export_privately(private, parent, candidate, x, split)
        stale = staleness_check(exported.model_card)
        if stale is not None:
            checks.append(stale)
        return _publish_or_reject(parent, exported, checks, promote)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _export_privately(
    private: Path,
    parent: StableParent,
    candidate: CandidateExport,
    x: np.ndarray,
    split: TrafficSplit,
) -> ExportResult:
    """The candidate exported under ``private`` with drift thresholds and staleness measured."""
    drift_x = x[split.held] if len(x[split.held]) >= MIN_DRIFT_IMAGES else x
    drift = parent.card.bn_reference.drift
    window = drift.window if drift is not None and drift.window else drift_scores.DEFAULT_WINDOW
    return export_model(
        candidate.model,
        model_base=private,
        name=parent.name,
        task=candidate.task,
        spec=candidate.spec,
        labels=candidate.labels,
        postprocess=candidate.postprocess,
        probe_layers=parent.probe_names,
        card_fields=candidate.card_fields,
        warmup_images=x[:8],
        version_labels=(),
        extra_files=candidate.extra_files,
        drift_images=drift_x,
        staleness_images=x[split.fit],
        drift_window=min(window, max(MIN_DRIFT_IMAGES, len(drift_x) // 2)),
        force=True,  # a stale candidate is rejected below, with the reason, and kept
    )


def _publish_or_reject(
    parent: StableParent, exported: ExportResult, checks: list[GateCheck], promote: str
) -> Publication:
    """Number the exported candidate, record the gate in its card, publish or reject it."""
    repo, name = parent.repo, parent.name
    passed = gate_passed(checks)
    new_card = dict(exported.card)
    new_card["lineage"] = {
        **new_card["lineage"],
        "gate": {"passed": passed, "checks": [c.to_dict() for c in checks]},
    }
    moved: dict[str, int] = {}
    with repo.lock():
        version = repo.next_version(name)
        new_card["version"] = version
        write_model_card(exported.path, new_card)
        if passed:
            repo.publish(name, exported.path, version)
            move_label(repo, name, promote, version, "calibrate", parent=parent.version)
            moved[promote] = version
            return Publication(parent, True, version, repo.version_dir(name, version), moved)
        _write_rejection(exported.path, checks)
        return Publication(parent, False, version, repo.reject(name, exported.path, version), moved)


def _write_rejection(version_dir: Path, checks: list[GateCheck]) -> None:
    """``assets.extra/rejection.json``: why the gate refused the candidate, and every check."""
    reasons = [c.reason for c in checks if c.gating and not c.passed]
    (version_dir / "assets.extra" / "rejection.json").write_text(
        json.dumps(
            {"reasons": reasons, "gate": [c.to_dict() for c in checks]}, indent=1, default=float
        )
        + "\n"
    )
