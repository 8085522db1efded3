"""vagrant/Vagrantfile is valid for its providers and runs the same entry point as CI.
(`vagrant validate` needs no box, so nothing is downloaded.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def validate(directory: Path, provider: str) -> subprocess.CompletedProcess:
    return subprocess.run(["vagrant", "validate"], cwd=directory, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VAGRANT_DEFAULT_PROVIDER": provider, "VAGRANT_CHECKPOINT_DISABLE": "1"})


def test_vagrantfile_validates_with_the_libvirt_provider():
    proc = validate(VAGRANT_DIR, "libvirt")
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, proc.stdout + proc.stderr


def test_validation_catches_a_bad_provider_setting(tmp_path):
    broken = (VAGRANT_DIR / "Vagrantfile").read_text().replace("lv.nested = true", "lv.nested_typo = true")
    (tmp_path / "Vagrantfile").write_text(broken)
    proc = validate(tmp_path, "libvirt")
    assert proc.returncode != 0 or "nested_typo" in proc.stdout + proc.stderr
    shutil.rmtree(tmp_path / ".vagrant", ignore_errors=True)


def test_vagrant_provisions_with_the_ci_entry_point():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert "bash .ci/run" in text and 'synced_folder ".."' in text
