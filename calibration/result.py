"""What a calibration run did and measured: :class:`CalibrationResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.gate import GateCheck
from calibration.temperature import TemperatureFit

#: Outcomes of a run, as job files and the ``outcome`` metric label name them.
PUBLISHED = "published"
REJECTED = "rejected"
INSUFFICIENT_SAMPLES = "insufficient_samples"
FAILED = "failed"


@dataclass
class CalibrationResult:
    """What a calibration run did and measured."""

    name: str
    status: str  # PUBLISHED | REJECTED
    version: int
    path: Path
    parent_version: int
    labels_moved: dict[str, int]
    checks: list[GateCheck]
    temperature: float
    temperature_fit: TemperatureFit | None
    accuracy: dict[str, Any]
    samples: dict[str, Any]
    prior_strength: float = 0.0
    prior_search: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether the candidate was published."""
        return self.status == PUBLISHED

    @property
    def reasons(self) -> list[str]:
        """Why the gate rejected the candidate (empty when it passed)."""
        return [c.reason for c in self.checks if c.gating and not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """The result as the command line prints it (JSON-ready but for numpy floats)."""
        return {
            "name": self.name,
            "status": self.status,
            "version": self.version,
            "path": str(self.path),
            "parent_version": self.parent_version,
            "labels_moved": self.labels_moved,
            "reasons": self.reasons,
            "gate": [c.to_dict() for c in self.checks],
            "temperature": self.temperature,
            "temperature_fit": None
            if self.temperature_fit is None
            else self.temperature_fit.to_dict(),
            "accuracy": self.accuracy,
            "samples": self.samples,
            "prior_strength": self.prior_strength,
            "prior_search": self.prior_search,
        }
