"""The model contract that training, calibration and the gateway all live by.

Everything here decides what a served model *is*: how image bytes become the
model input (:mod:`.preprocessing`), what a version says about itself
(:mod:`.model_card`), how versions and labels are laid out on disk
(:mod:`.repository`), which BatchNorm layers are probed and how their statistics
are re-estimated (:mod:`.bn`), how live statistics are scored against them
(:mod:`.drift_scores`), and how a model is written as a servable version
(:mod:`.export`). Editing a module here changes the live gateway as much as the
trainers. This package imports no other package of the project.
"""
