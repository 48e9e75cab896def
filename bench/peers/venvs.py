"""Each peer's own virtualenv (``.venv-peers/<peer>``), made from its pinned lock.

``python3 -m venv`` with the system interpreter, then ``pip install -r
requirements.txt``; a stamp file holds the lock's sha256, so a changed lock
reinstalls and an unchanged one costs nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

STAMP = ".requirements.sha256"


def lock_digest(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def ensure_venv(venv: Path, requirements: Path, log: Path, python: str = "python3") -> Path:
    """The venv's python, (re)made when the lock changed; raises RuntimeError (the
    tail of pip's output) when the install fails."""
    digest = lock_digest(requirements)
    stamp = venv / STAMP
    py = venv / "bin" / "python"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return py
    if venv.exists():
        shutil.rmtree(venv)
    with log.open("w") as out:
        for cmd in (
            [python, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "-q", "-r", str(requirements)],
        ):
            print(f"  {' '.join(cmd)}", file=sys.stderr, flush=True)
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                tail = log.read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"{' '.join(cmd[1:3])} failed: {' / '.join(tail)}")
    stamp.write_text(digest + "\n")
    return py
