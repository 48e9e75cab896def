"""The product's command line, ``imgserve``: run the servers, train, calibrate, and call the API.

The top layer of the project, and the only package that imports training,
calibration and serving together: each subcommand is a thin adapter over the
library that owns the job (:mod:`imgserve.cli` lists them).
"""
