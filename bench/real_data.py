"""The real-data quality bar: scikit-learn's handwritten digits through the command line.

    .venv/bin/python bench/real_data.py [--side 64] [--flags "..."]

Writes the 1,797 digits (8x8 greyscale) upscaled to ``--side`` pixels as class folders
``DIR/<digit>/<n>.png`` (sorted by class, as a user's data arrives), then runs
``python -m training classifier --data DIR`` with default flags (plus ``--flags``).
Prints a Markdown table row: held-out (test split) accuracy with precise BN (the
card's figure) and without it (the same trained weights in inference mode before
precise BN, which the run also measures: the paired answer to "what does precise BN
do"), the parity gap with its interval and the gate's decision, exit status and wall
time. The bar: >= 97 % held-out accuracy in <= 10 minutes on 2 CPU cores with default
flags. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.digits import write_digits  # noqa: E402

TARGET_ACCURACY = 0.97
TARGET_SECONDS = 600


def run(data: Path, models: Path, name: str, flags: list[str]) -> dict:
    """One CLI training; its summary (the JSON line it prints last), exit status, time."""
    cmd = [sys.executable, "-m", "training", "classifier", "--data", str(data)]
    cmd += ["--model-base", str(models), "--name", name, *flags]
    print("$", shlex.join(cmd[1:]), flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if not summary:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    # The run's own report of its held-out figures, as a user sees it.
    for line in lines:
        if line.startswith(("held-out accuracy", "validation accuracy", "parity (")):
            print("  " + line, flush=True)
    for line in proc.stderr.splitlines():
        if line.startswith("error:"):
            print("  " + line, flush=True)
    return {"flags": flags, "rc": proc.returncode, "seconds": seconds, "summary": summary}


def row(result: dict) -> str:
    """A Markdown table row of one run."""
    s, flags = result["summary"], " ".join(result["flags"]) or "(defaults)"
    if not s:
        return f"| {flags} | failed (exit {result['rc']}) | | | | | {result['seconds']:.0f} s |"
    p, raw = s["parity"], s.get("parity_before_precise_bn", {})
    lo, hi = p.get("interval") or (float("nan"), float("nan"))
    return (
        f"| {flags} | {s['accuracy']:.4f} ({s['test_images']} images) | "
        f"{raw.get('inference_mode', float('nan')):.4f} | "
        f"{100 * p['gap']:+.2f} pts [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
        f"{p.get('decision', p['passed'])} (p = {p.get('p_value', float('nan')):.2g}) | "
        f"{result['rc']} | {result['seconds']:.0f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=64, help="pixels the 8x8 digits are written at")
    parser.add_argument("--flags", default="", help="extra CLI flags for every run")
    args = parser.parse_args(argv)
    flags = shlex.split(args.flags)
    with tempfile.TemporaryDirectory(prefix="digits-") as tmp:
        data = write_digits(Path(tmp) / "digits", size=args.side)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        print(
            f"digits ({args.side}x{args.side} PNG class folders), {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}, commit {commit or 'unknown'}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            flush=True,
        )
        runs = [run(data, Path(tmp) / "models", "digits", flags)]
    print(
        "| flags | held-out accuracy | without precise BN | parity gap [95% interval] "
        "| gate | exit | time |"
    )
    print("|---|---|---|---|---|---|---|")
    print(row(runs[0]))
    first = runs[0]
    ok = (
        first["summary"].get("accuracy", 0.0) >= TARGET_ACCURACY
        and first["seconds"] <= TARGET_SECONDS
    )
    print(
        f"bar (>= {TARGET_ACCURACY:.0%} held-out in <= {TARGET_SECONDS // 60} min, defaults): "
        + ("met" if ok else "NOT met")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
