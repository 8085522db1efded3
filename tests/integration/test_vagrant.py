"""vagrant/Vagrantfile is valid for its provider and does what it says (the Vagrant
run itself, box and all, is tests/vagrant)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def validate(directory: Path, provider: str) -> subprocess.CompletedProcess:
    return subprocess.run(["vagrant", "validate"], cwd=directory, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VAGRANT_DEFAULT_PROVIDER": provider, "VAGRANT_CHECKPOINT_DISABLE": "1",
                               "TCBYPASS_LIBVIRT_DRIVER": "qemu"})


def test_vagrantfile_validates_with_the_libvirt_provider():
    proc = validate(VAGRANT_DIR, "libvirt")
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, proc.stdout + proc.stderr


def test_validation_catches_a_bad_provider_setting(tmp_path):
    broken = (VAGRANT_DIR / "Vagrantfile").read_text().replace("lv.memory = MEMORY", "lv.memory_typo = MEMORY")
    (tmp_path / "Vagrantfile").write_text(broken)
    proc = validate(tmp_path, "libvirt")
    assert proc.returncode != 0 or "memory_typo" in proc.stdout + proc.stderr
    shutil.rmtree(tmp_path / ".vagrant", ignore_errors=True)


def test_the_vagrantfile_uses_the_local_box_an_isolated_network_and_fails_with_the_tests():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert 'LOCAL_BOX = "tcbypass/debian12"' in text and 'ENV.fetch("TCBYPASS_BOX", LOCAL_BOX)' in text
    assert 'management_network_mode = "none"' in text
    assert "set -e" in text and ".venv/bin/python -m pytest $TESTS" in text
