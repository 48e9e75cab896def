"""Target assignment: which anchor learns which ground-truth box.

By IoU (RetinaNet/SSD rules):

- IoU >= ``positive_iou`` with its best ground-truth box: positive for that box;
- IoU < ``negative_iou`` with every box: background (negative);
- in between: ignored (no loss), because such anchors are neither clearly
  right nor clearly wrong;
- every ground-truth box also claims its single best anchor (``force_best_match``)
  even below ``positive_iou``, so small or oddly shaped objects are never left
  without a positive anchor.

Labels use 0 for background, ``k + 1`` for class ``k`` and -1 for ignore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from training.detection.boxes import DEFAULT_VARIANCES, encode_boxes, iou_matrix

IGNORE = -1
BACKGROUND = 0


@dataclass(frozen=True)
class MatchConfig:
    """IoU thresholds of target assignment; recorded in the model card."""

    positive_iou: float = 0.5
    negative_iou: float = 0.4
    force_best_match: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.negative_iou <= self.positive_iou <= 1.0:
            raise ValueError(
                "need 0 < negative_iou <= positive_iou <= 1, got "
                f"{self.negative_iou} and {self.positive_iou}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MatchResult:
    """Per-anchor targets for one image."""

    labels: np.ndarray  # [A] int32: -1 ignore, 0 background, k + 1 for class k
    matched_gt: np.ndarray  # [A] int32: index of the assigned box, -1 if none
    box_targets: np.ndarray  # [A, 4] float32 box codes (zeros where not positive)

    @property
    def num_positive(self) -> int:
        return int(np.sum(self.labels > 0))


def match_anchors(
    anchors: np.ndarray,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    config: MatchConfig = MatchConfig(),
    variances: Sequence[float] = DEFAULT_VARIANCES,
) -> MatchResult:
    """Assign ``[A, 4]`` anchors to ``[N, 4]`` normalised ground-truth boxes of ``[N]`` classes.

    Boxes with zero height or width are dropped (they cannot be encoded).
    """
    anchors = np.asarray(anchors, dtype=np.float32)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_classes = np.asarray(gt_classes, dtype=np.int64).reshape(-1)
    if len(gt_boxes) != len(gt_classes):
        raise ValueError(f"{len(gt_boxes)} boxes but {len(gt_classes)} classes")
    if np.any(gt_classes < 0):
        raise ValueError("class indices must be >= 0")
    keep = (gt_boxes[:, 2] > gt_boxes[:, 0]) & (gt_boxes[:, 3] > gt_boxes[:, 1])
    gt_boxes, gt_classes = gt_boxes[keep], gt_classes[keep]
    original_index = np.flatnonzero(keep)

    num = len(anchors)
    labels = np.full(num, BACKGROUND, dtype=np.int32)
    matched = np.full(num, -1, dtype=np.int32)
    targets = np.zeros((num, 4), dtype=np.float32)
    if len(gt_boxes) == 0:
        return MatchResult(labels, matched, targets)

    iou = iou_matrix(anchors, gt_boxes)  # [A, N]
    best_gt = iou.argmax(axis=1)
    best_iou = iou[np.arange(num), best_gt]
    assigned = np.where(best_iou >= config.positive_iou, best_gt, -1)
    labels[(best_iou >= config.negative_iou) & (best_iou < config.positive_iou)] = IGNORE

    if config.force_best_match:
        # Each box takes its best anchor; boxes are visited from the best-covered to
        # the worst, so when two boxes want one anchor the harder one keeps it.
        best_anchor = iou.argmax(axis=0)
        order = np.argsort(-iou[best_anchor, np.arange(len(gt_boxes))], kind="stable")
        for j in order:
            if iou[best_anchor[j], j] > 0:
                assigned[best_anchor[j]] = j

    pos = assigned >= 0
    labels[pos] = gt_classes[assigned[pos]].astype(np.int32) + 1
    matched[pos] = original_index[assigned[pos]]
    targets[pos] = encode_boxes(gt_boxes[assigned[pos]], anchors[pos], variances)
    return MatchResult(labels, matched, targets)
