"""``imgserve`` and each subcommand's ``--help``, run as the console script runs them,
in subprocesses; and the lazy building of subcommands that keeps client calls light."""

from __future__ import annotations

import os
import subprocess

import pytest

from imgserve.cli import COMMANDS, build_parser, requested_command
from tests.helpers.servers import PYTHON, ROOT

HELPS = {
    (): ["serve", "grpc", "train", "calibrate", "promote", "rollback", "classify", "detect"],
    ("serve",): ["--bind", "--workers", "--model-base", "IMGSERVE_BIND"],
    ("grpc",): ["--bind", "--workers", "--metrics-bind", "IMGSERVE_GRPC_BIND"],
    ("train",): ["classifier", "detector"],
    # The training command's own flags, unchanged.
    ("train", "classifier"): ["--data", "--name", "--preset", "--epochs", "--augment", "--label"],
    ("train", "detector"): ["--data", "--name", "--strides", "--score-threshold"],
    ("calibrate",): ["--samples", "--prior-strength", "--promote", "Exit codes: 0 published"],
    ("promote",): ["--name", "--version", "--label"],
    ("rollback",): ["--name", "--label"],
    ("classify",): ["FILE", "--url", "--grpc", "--top-k", "--version", "--label", "--json"],
    ("detect",): ["FILE", "--url", "--grpc", "--out", "--score-threshold", "--json"],
    ("feedback",): ["REQUEST_ID", "LABEL", "--objects", "--url", "--grpc", "0 recorded"],
}
TRAINING = ("python -m training",)


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """``python -m imgserve ... --help`` for every command, all started at once (the
    training and calibration ones import TensorFlow; one after another is slow)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    commands = {words: ["imgserve", *words] for words in HELPS}
    commands[TRAINING] = ["training"]  # the old command line, beside the new one
    procs = {
        words: subprocess.Popen(
            [PYTHON, "-m", *command, "--help"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for words, command in commands.items()
    }
    done = {}
    for words, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[words] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_every_command_has_a_help_case():
    assert {words[0] for words in HELPS if words} == set(COMMANDS)


@pytest.mark.parametrize("words", list(HELPS), ids=lambda w: " ".join(w) or "imgserve")
def test_help_names_the_command_and_lists_its_flags(helps, words):
    result = helps[words]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(['imgserve', *words])} ")
    text = " ".join(result.stdout.split())  # argparse wraps lines at the terminal width
    missing = [flag for flag in HELPS[words] if flag not in text]
    assert not missing, result.stdout


def test_a_command_is_required(capsys):
    from imgserve.cli import main

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_only_the_command_being_run_adds_its_flags():
    parser = build_parser("classify")
    args = parser.parse_args(["classify", "a.jpg", "--top-k", "2"])
    assert (args.files, args.top_k) == (["a.jpg"], 2)
    # Any other command is listed but has no flags: its modules were never imported.
    with pytest.raises(SystemExit):
        build_parser("classify").parse_args(["serve", "--bind", "x:1"])


def test_the_requested_command_is_the_first_word():
    assert requested_command(["--help"]) is None
    assert requested_command(["train", "classifier", "--help"]) == "train"
    assert requested_command(["-h", "detect", "x.jpg"]) == "detect"


def test_a_client_command_imports_neither_tensorflow_nor_the_trainers():
    code = (
        "import sys; from imgserve.cli import build_parser; "
        "build_parser('detect').parse_args(['detect', 'x.jpg']); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'training', 'calibration') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_python_m_training_keeps_its_own_name(helps):
    result = helps[TRAINING]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m training ")
    assert "classifier" in result.stdout and "calibrate" in result.stdout
