"""`tcbypass doctor` on this node: all green after setup, and a failure names its fix."""

from __future__ import annotations

from tests.conftest import pins, run_cli


def test_doctor_is_all_green_after_setup():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("root and capabilities", "bpffs", "kernel headers", "bcc", "clsact", "compile and load"):
        assert f"ok   {check}" in proc.stdout, proc.stdout
    assert not pins("doctor-"), "the scratch instance is removed"


def test_doctor_names_the_fix_for_a_missing_bpffs(tmp_path):
    proc = run_cli("doctor", env={"TCBYPASS_BPFFS": str(tmp_path)})
    assert proc.returncode == 1
    assert "FAIL bpffs" in proc.stdout and f"fix: mount -t bpf bpf {tmp_path}" in proc.stdout
