"""The raymia command runs with the allocator settings (raymia/allocator.py); opting out is honoured."""

import os
import subprocess
import sys

from raymia.allocator import ALLOCATOR_ENV

CODE = ("import os, sys; from raymia.allocator import reexec_with_allocator_env; reexec_with_allocator_env(); "
        "print(os.environ.get('MALLOC_TRIM_THRESHOLD_'), sys.argv[1:])")


def _run(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV} | extra
    return subprocess.run([sys.executable, "-c", CODE, "a", "b"], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_process_without_the_settings_restarts_once_with_them_and_keeps_its_arguments():
    assert _run() == f"{ALLOCATOR_ENV['MALLOC_TRIM_THRESHOLD_']} ['a', 'b']"


def test_opting_out_keeps_glibcs_defaults():
    assert _run(RAYMIA_MALLOC_TUNING="0") == "None ['a', 'b']"
