"""The environment TensorFlow reads at import: call :func:`prepare_tensorflow_environment` first.

The gateway (gunicorn's master, the app), the gRPC server and the trainers call it
before anything imports TensorFlow; child processes (gunicorn workers, gRPC workers,
calibration jobs) inherit what it set.

Why ``TF_ENABLED_DEVICE_TYPES`` and not ``CUDA_VISIBLE_DEVICES=""``: the pip
TensorFlow is a CUDA build, and on a machine without an NVIDIA driver its GPU device
factory calls ``cuInit`` when the runtime first lists devices, which fails and logs
``E ... cuda_platform.cc] failed call to cuInit`` on every start. An empty
``CUDA_VISIBLE_DEVICES`` does not stop that call (TensorFlow 2.21 still logs it);
``TF_ENABLED_DEVICE_TYPES=CPU`` registers the CPU device factory only, so CUDA is
never initialised. Where an NVIDIA device exists, or the user chose devices
themselves, nothing is changed, and a real CUDA failure is still logged.

:func:`import_tensorflow` imports it with what its C++ runtime writes to stderr while
loading (before absl's logging is initialised it ignores ``TF_CPP_MIN_LOG_LEVEL``)
turned into JSON records of the ``tensorflow.native`` logger, so a process that logs
JSON lines writes only JSON lines: info lines at DEBUG, warnings and errors as such.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path
from types import ModuleType

from contract.logs import JsonLineFormatter

#: absl/glog's line prefix: severity, MMDD, time, thread id, file:line.
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} \S+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_NATIVE_LEVELS = {
    "I": logging.DEBUG,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}

#: Variables by which a user chooses devices; when one is set, the choice is theirs.
USER_DEVICE_CHOICE = ("CUDA_VISIBLE_DEVICES", "TF_ENABLED_DEVICE_TYPES")


def has_nvidia_device(dev: Path = Path("/dev")) -> bool:
    """Whether the kernel exposes an NVIDIA GPU (``/dev/nvidia0``, ``/dev/nvidia1``, ...)."""
    return any(p.name.removeprefix("nvidia").isdigit() for p in dev.glob("nvidia*"))


def prepare_tensorflow_environment(
    environ: MutableMapping[str, str] | None = None, dev: Path = Path("/dev")
) -> None:
    """Set what TensorFlow must read at import; a no-op for what the user already set.

    - ``TF_CPP_MIN_LOG_LEVEL=2``: TensorFlow's C++ info and warning lines off (errors stay).
    - ``TF_ENABLED_DEVICE_TYPES=CPU`` when there is no NVIDIA device and the user set
      neither ``CUDA_VISIBLE_DEVICES`` nor ``TF_ENABLED_DEVICE_TYPES``: no doomed
      ``cuInit`` and its error line (see the module docstring).
    """
    environ = os.environ if environ is None else environ
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not any(key in environ for key in USER_DEVICE_CHOICE) and not has_nvidia_device(dev):
        environ["TF_ENABLED_DEVICE_TYPES"] = "CPU"


def import_tensorflow() -> ModuleType:
    """``import tensorflow``, its C++ start-up lines logged as records (see the module doc)."""
    with native_stderr_logged(logging.getLogger("tensorflow.native")):
        import tensorflow
    return tensorflow


@contextlib.contextmanager
def native_stderr_logged(logger: logging.Logger) -> Iterator[None]:
    """Inside the block, what is written to file descriptor 2 goes through a relay process
    that turns absl lines into JSON records of ``logger`` (``source`` = file:line, this
    process's id) and passes other text on unchanged.

    A process, not a thread or a buffer: when the block dies of a fatal error (absl's
    ``LOG(FATAL)`` aborts), the relay still reads to the end and the reason is printed.
    """
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    relay = subprocess.Popen(
        [sys.executable, "-m", "contract.tf_environment", logger.name]
        + [str(logger.getEffectiveLevel()), str(os.getpid())],
        stdin=read_end,
        stdout=saved,
        stderr=saved,
        env=env,
    )
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the relay's input closes with the last write end: it ends
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):
            relay.wait(timeout=30)


def relay_native_lines(lines: Iterable[str], logger: logging.Logger) -> None:
    """Log each absl line (with its continuation lines) as a record of ``logger``; write
    anything else, JSON lines of Python's logging included, to stderr as it is."""
    record: list = []  # [level, source, lines] of the absl line being read

    def flush() -> None:
        if record:
            logger.log(record[0], "\n".join(record[2]), extra={"source": record[1]})
            record.clear()

    for raw in lines:
        line = raw.rstrip("\n")
        match = _NATIVE_LINE.match(line)
        if match:
            flush()
            record.extend([_NATIVE_LEVELS[match[1]], match[2], [match[3]]])
        elif line.startswith("WARNING: All log messages before absl::InitializeLog()"):
            flush()  # absl's note on the lines above; nothing to report
        elif record and not line.startswith("{"):
            record[2].append(line)  # a message's continuation line (not a JSON log line)
        else:
            flush()
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
    flush()


def _relay_main(logger_name: str, level: str, pid: str) -> None:
    """The relay process of :func:`native_stderr_logged`: stdin to JSON lines on stderr."""

    class ParentProcess(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.process = int(pid)  # the lines are the parent's, not the relay's
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    handler.addFilter(ParentProcess())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(int(level))
    logger.propagate = False
    relay_native_lines(sys.stdin, logger)


if __name__ == "__main__":
    _relay_main(*sys.argv[1:4])
