"""tools/setup_venv.sh: a torch that cannot be installed is reported, not swapped for another build."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.e2e
def test_failed_torch_install_is_shown_not_replaced(tmp_path):
    env = dict(os.environ, PQM_VENV=str(tmp_path / "venv"), PQM_TORCH="torch==0.0.1")
    proc = subprocess.run(["bash", "tools/setup_venv.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "pip could not install torch==0.0.1 (its error is above)" in proc.stderr
    assert "torch==0.0.1" in proc.stderr.split("setup_venv.sh:")[0]  # pip's own error is shown
    assert not (tmp_path / "venv" / ".pqm-stamp").exists()
    assert not list((tmp_path / "venv").glob("lib/python*/site-packages/torch"))  # no other build installed
