"""The Prometheus multiprocess directory of a server that runs several worker processes.

gunicorn's master (``serving/gunicorn.conf.py``) and the gRPC supervisor
(``serving/api/grpc/supervisor.py``) do the same four things with it:

- use ``PROMETHEUS_MULTIPROC_DIR`` when it is set, else make a private directory
  (on tmpfs when there is one) and put it in the environment, for the workers;
- empty it of samples before the first worker starts (a directory that outlived a
  restart, such as a Kubernetes emptyDir, would resurrect old counts);
- mark each worker that exits as dead, so its live gauges stop counting;
- remove the private directory at exit (a given one is left alone).

This module does not import ``prometheus_client`` at import time: the directory
must be in the environment before ``prometheus_client`` is first imported, which
picks its value class then (forked gunicorn workers inherit that choice).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"


def tmpfs_dir() -> str | None:
    """``/dev/shm`` when it is a writable directory (tmpfs), else None (the temp directory)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass(frozen=True)
class MetricsDirectory:
    """The directory every worker writes its samples to, and whether this process made it."""

    path: Path
    private: bool

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> MetricsDirectory:
        """``PROMETHEUS_MULTIPROC_DIR``, or a new private directory that is put there."""
        environ = os.environ if environ is None else environ
        if environ.get(ENV_VAR):
            return cls(Path(environ[ENV_VAR]), private=False)
        path = tempfile.mkdtemp(prefix="imgserve-metrics-", dir=tmpfs_dir())
        environ[ENV_VAR] = path
        return cls(Path(path), private=True)

    def clear(self) -> None:
        """Create the directory if needed and delete every sample file in it."""
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.glob("*.db"):
            entry.unlink(missing_ok=True)

    def mark_process_dead(self, pid: int) -> None:
        """A worker exited: drop its live gauges (its counters and histograms still count)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.path))

    def remove(self) -> None:
        """Delete the directory if this process made it."""
        if self.private:
            shutil.rmtree(self.path, ignore_errors=True)
