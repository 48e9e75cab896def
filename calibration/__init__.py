"""The online calibration path, which runs beside the gateway.

:mod:`.capture_store` is the store the gateway writes captured requests and
feedback into; :mod:`.classifier` and :mod:`.detector` turn captured traffic
into a calibrated model version (re-estimate BN statistics, fine-tune on
labelled feedback, fit a temperature, gate, publish, promote by label, roll
back); :mod:`.jobs` runs one calibration at a time in a child process for the
gateway. Editing :mod:`.capture_store` or :mod:`.jobs` changes the live gateway.
"""
