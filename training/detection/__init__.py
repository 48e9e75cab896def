"""MobileNetV2 SSDLite object detection: anchors, targets, losses, model, data, training.

Modules, in the order a run uses them: :mod:`.data` (COCO loader, synthetic
set), :mod:`.augment` and :mod:`.pipeline` (inputs and targets),
:mod:`.anchors`, :mod:`.boxes` and :mod:`.matching` (box geometry and target
assignment), :mod:`.model` and :mod:`.losses`, :mod:`.postprocess` (decode +
NMS in the graph), :mod:`.evaluate` (COCO mAP) and :mod:`.train` (the run and
its command line).
"""
