"""Run a test module's ``--worker`` under the Triton CPU interpreter in a child process.

``TRITON_INTERPRET=1`` must be set before Triton kernels are imported, and other test modules may
already have imported them in this process, so the kernel cases run in a child that prints a JSON
report {case name: "ok" or what differed} as its last line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict


def run_worker(test_file: str) -> Dict[str, str]:
    """Run ``python test_file --worker`` with the interpreter forced; return its report."""
    env = dict(os.environ, TRITON_INTERPRET="1", VPRUNE_KERNELS="triton")
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_cases(report: Dict[str, str], prefix: str) -> None:
    """Every case whose name starts with ``prefix`` matched the reference (and there is at least one)."""
    cases = {k: v for k, v in report.items() if k.startswith(prefix)}
    assert cases, f"no worker cases start with {prefix!r}"
    bad = {k: v for k, v in cases.items() if v != "ok"}
    assert not bad, f"{len(bad)}/{len(cases)} cases differ from the reference: {dict(list(bad.items())[:5])}"
