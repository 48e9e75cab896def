"""gunicorn settings for the gateway: ``gunicorn -c serving/gunicorn.conf.py 'serving.app:create_app()'``.

Sizing, from the ``IMGSERVE_*`` settings (``serving/settings.py``):

- ``gthread`` workers: request threads mostly wait on the dynamic batcher, so a
  worker holds many (``IMGSERVE_THREADS``, 128: more than a running batch plus the
  queue bound, so overload is shed by the batcher with 429 instead of piling up
  in gunicorn's connection queue) while TensorFlow runs the batches.
- ``embedded`` backend: one worker per core by default, each a full copy of
  every model with its own TensorFlow runtime and a one-thread intra-op pool:
  request handling (one GIL per process) and forward passes then spread over
  every core. With ``IMGSERVE_WORKERS=N`` each worker's pool gets cores / N - 1
  threads (at least 1), so the workers together do not oversubscribe the CPU.
- TF Serving backends: the gateway only decodes and forwards, so 2 workers per core.
- No preload: TensorFlow is not fork-safe, every worker imports it after the fork.

Prometheus multiprocess mode (``serving/metrics_dir.py``, shared with the gRPC
supervisor): ``PROMETHEUS_MULTIPROC_DIR`` is set here, in the master, before any
worker imports ``prometheus_client``; it is emptied when the server starts, and
``child_exit`` marks a dead worker's live gauges as gone.

Logging (``contract/logs.py``): the master and the workers write JSON lines to stderr
at ``IMGSERVE_LOG_LEVEL`` through ``logconfig_dict``. gunicorn's own access log stays
off: the app writes the access line (``serving/api/rest/access.py``), which knows the
request id and the status the app really sent.
"""

from __future__ import annotations

import ctypes
import os

from contract.logs import logging_config
from contract.tf_environment import prepare_tensorflow_environment
from serving.metrics_dir import MetricsDirectory, tmpfs_dir
from serving.settings import Settings

_settings = Settings.from_env()
_shm = tmpfs_dir()

bind = [_settings.bind]
workers = _settings.worker_count()
worker_class = "gthread"
threads = _settings.threads
# Worker heartbeat: longer than the slowest model load at boot, shorter than a hang.
timeout = 120
# SIGTERM: stop accepting, let requests in flight (and their batches) finish.
graceful_timeout = 30
keepalive = 5
preload_app = False
# Heartbeat files on tmpfs: a slow disk must not make healthy workers look dead.
worker_tmp_dir = _shm
accesslog = None
errorlog = "-"
loglevel = _settings.log_level
# Any logconfig_dict switches gunicorn's access log on; its lines would lack the request
# id and duplicate the app's, so its logger only passes what never comes: CRITICAL.
logconfig_dict = logging_config(
    _settings.log_level,
    loggers={"gunicorn.error": _settings.log_level, "gunicorn.access": "critical"},
)
proc_name = "imgserve-gateway"

# Every worker sizes its TensorFlow pools from the worker count the master chose.
os.environ.setdefault("IMGSERVE_WORKERS", str(workers))
# Before any worker imports TensorFlow: the workers inherit this environment.
prepare_tensorflow_environment()

_metrics_dir = MetricsDirectory.from_environ()

# glibc gives threads that allocate at once their own malloc arenas (up to 8 per core)
# and seldom returns their memory: after floods of large images the workers held
# 2.9-3.4 GB in arenas, 1.25 GB with 2. glibc reads MALLOC_ARENA_MAX once, at process
# start, and the workers are forked from this master, not exec'd: setting the variable
# here reaches neither. So the master sets the same limit with mallopt before it forks
# (the workers inherit it), and exports the variable for what the gateway execs
# (calibration jobs). The Dockerfile and k8s/base/gateway.yaml set it too.
_M_ARENA_MAX = -8  # glibc <malloc.h>
MALLOC_ARENA_MAX = int(os.environ.setdefault("MALLOC_ARENA_MAX", "2"))
_mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent outside glibc (musl)
if _mallopt is not None:
    _mallopt(_M_ARENA_MAX, MALLOC_ARENA_MAX)


def on_starting(server) -> None:
    """Start from an empty metrics directory: stale files would resurrect old counts."""
    _metrics_dir.clear()
    server.log.info(
        "imgserve gateway: backend=%s workers=%d threads=%d metrics=%s",
        _settings.backend,
        workers,
        threads,
        _metrics_dir.path,
    )


def child_exit(server, worker) -> None:
    """A worker died or was replaced: its live gauges must stop counting."""
    _metrics_dir.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    _metrics_dir.remove()
