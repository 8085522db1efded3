"""`tcbypass doctor` on this node: all green after setup, and a failure names its fix."""

from __future__ import annotations

import json

from tests.conftest import pins, run_cli


def test_doctor_is_all_green_after_setup():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("root and capabilities", "bpffs", "tcx links", "bpf_redirect_peer", "devmap lookup from tc",
                  "program build", "tcx hook", "verifier"):
        assert f"ok   {check}" in proc.stdout, proc.stdout
    assert "path: tcx, from the VM by bpf_redirect_peer" in proc.stdout
    assert not pins("doctor-"), "the scratch instance is removed"


def test_doctor_json_reports_the_kernels_features_and_the_path():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["features"] == {"tcx": True, "redirect_peer": True, "devmap_lookup": True, "run_time_stats": True,
                                  "kernel_types_peer": True,  # 6.18: peer-redirected frames arrive PACKET_HOST
                                  "memcg_accounting": True}  # 5.11+: BPF memory is not charged to RLIMIT_MEMLOCK
    assert report["path"] == {"hook": "tcx", "from_vm": "peer"}
    assert all(c["ok"] for c in report["checks"])


def test_doctor_names_the_fix_for_a_missing_bpffs(tmp_path):
    proc = run_cli("doctor", env={"TCBYPASS_BPFFS": str(tmp_path)})
    assert proc.returncode == 1
    assert "FAIL bpffs" in proc.stdout and f"fix: mount -t bpf bpf {tmp_path}" in proc.stdout
