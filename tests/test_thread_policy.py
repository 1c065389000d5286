"""The CLI's thread policy: passive OpenMP waiting unless the user set a policy or a thread count."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Runs the CLI entry point in a fresh interpreter, then reports the environment and whether torch was imported
# before the policy was set (it must not be: OpenMP reads the variable when torch loads).
PROBE = (
    "import os, sys; from exoalign import cli; before = 'torch' in sys.modules; cli.main(['--version']); "
    "print('|'.join([os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('OMP_NUM_THREADS', '-'), str(before)]))"
)


def _run(extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1].split("|")


def test_passive_when_unset():
    assert _run({}) == ["PASSIVE", "-", "False"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "-", "False"]),
        ({"OMP_NUM_THREADS": "2"}, ["-", "2", "False"]),
        ({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}, ["ACTIVE", "1", "False"]),
    ],
)
def test_user_choice_respected(extra, expected):
    assert _run(extra) == expected


def test_policy_function_on_a_dict():
    env: dict[str, str] = {}
    from exoalign.cli import thread_policy

    thread_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "1"}
    thread_policy(env)
    assert env == {"OMP_NUM_THREADS": "1"}
