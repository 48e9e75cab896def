"""The online calibration path, which runs beside the gateway.

The gateway writes captured requests into :mod:`.capture_store` and feedback
through :mod:`.feedback`; :mod:`.samples` reads them back. A run is asked for
with a :class:`.config.CalibrationConfig` and started by
:func:`.dispatch.calibrate`, which hands the ``stable`` version to the
orchestrator of its task, :mod:`.classifier` or :mod:`.detector`. Each reads as
named steps over shared modules: load (:mod:`.model_io`, :mod:`.traffic`),
re-estimate BN statistics and choose the prior (:mod:`.reestimate`), fine-tune
(:mod:`.fine_tune`), fit a temperature (:mod:`.temperature`), gate
(:mod:`.gate`, :mod:`.classifier_gate`, :mod:`.detector_gate`), publish or
reject (:mod:`.publish`); :mod:`.labels` promotes and rolls back.
:mod:`.cli` is the command line, :mod:`.jobs` runs one calibration at a time in
a child process for the gateway. Editing :mod:`.capture_store`,
:mod:`.feedback` or :mod:`.jobs` changes the live gateway.
"""
