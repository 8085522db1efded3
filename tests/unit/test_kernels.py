"""The kernel matrix's pure parts: image recipes, the guest's job, the qemu line, results and the report."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tcbypass_lab import kernel_results as results
from tcbypass_lab import kernels
from tcbypass_lab.kernel_image import (GUEST_PACKAGES, Image, ImageError, ImageRecipe, image_size_bytes,
                                       kernel_version_of, mmdebstrap_argv, pip_download_argv,
                                       requirements_from_pyproject, superseded)

REPO = Path(__file__).resolve().parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="3.2">
<testcase classname="tests.datapath.test_verdicts" name="test_a_is_redirected" time="0.51" />
<testcase classname="tests.datapath.test_verdicts" name="test_b[x]" time="1.2">
  <failure message="AssertionError: assert (0, 'pass runt') == (7, 'redirect from_vm')&#10;second line">trace</failure>
</testcase>
<testcase classname="tests.datapath.test_counters" name="test_c" time="0.1">
  <error message="failed on setup with &quot;Exception: cannot load program&quot;">trace</error>
</testcase>
<testcase classname="tests.datapath.test_counters" name="test_d" time="0.0">
  <skipped type="pytest.skip" message="needs two CPUs">skip</skipped>
</testcase>
</testsuite></testsuites>
"""


def recipe(**change) -> ImageRecipe:
    fields = {"target": kernels.targets()["6.1"], "packages": GUEST_PACKAGES,
              "requirements": ("pyroute2>=0.9", "click>=8.1"), **change}
    return ImageRecipe(**fields)


def test_the_mirror_targets_include_debian_12_and_11_by_default():
    known = kernels.targets()
    assert {"6.1", "5.10"} <= set(kernels.DEFAULT_KERNELS) <= set(known)
    assert known["6.1"].suite == "bookworm" and known["5.10-bullseye"].suite == "bullseye"
    assert known["5.10"].kernel_packages[0] == "linux-image-amd64/bullseye-security"
    assert all(any("-security" in s for s in t.sources) for t in known.values())


def test_recipe_key_is_stable_and_changes_with_every_input():
    base = recipe()
    assert base.key() == recipe().key()
    others = [recipe(requirements=("pyroute2>=0.9",)), recipe(packages=GUEST_PACKAGES + ("tcpdump",)),
              recipe(init_script="#!/bin/sh\n"), recipe(format=99),
              ImageRecipe(kernels.targets()["5.10"], GUEST_PACKAGES, base.requirements)]
    assert len({base.key(), *(r.key() for r in others)}) == 1 + len(others)
    assert base.dirname == f"6.1-{base.key()}"


def test_requirements_come_from_pyproject_with_the_test_extra_and_without_bench():
    reqs = requirements_from_pyproject((REPO / "pyproject.toml").read_text())
    names = {r.split(">")[0].split("<")[0].split("=")[0] for r in reqs}
    assert {"pyroute2", "click", "rich", "prometheus_client", "pytest", "hypothesis", "scapy", "pyyaml"} <= names
    assert "matplotlib" not in names


def test_wheels_are_fetched_as_binaries_for_the_guest_python():
    argv = pip_download_argv("3.9", ("pyroute2>=0.9",), "/w")
    assert argv[argv.index("--python-version") + 1] == "3.9"
    assert "--only-binary=:all:" in argv and "pyroute2>=0.9" in argv
    # pip judges markers by the host's Python: the backports older guests need are asked for outright.
    assert {"exceptiongroup", "tomli"} <= set(argv)


def test_mmdebstrap_bootstraps_the_suite_with_kernel_headers_and_our_init():
    r = recipe()
    argv = mmdebstrap_argv(r, "/x/rootfs", "/x/wheels", "/x/init", "/x/shim")
    include = next(a for a in argv if a.startswith("--include="))
    assert "linux-image-amd64" in include and "linux-headers-amd64" in include and "python3-bpfcc" in include
    assert argv[-len(r.target.sources) - 2:-len(r.target.sources)] == ["bookworm", "/x/rootfs"]
    assert list(argv[-len(r.target.sources):]) == list(r.target.sources)
    hooks = " ".join(argv)
    assert "upload /x/init /usr/local/sbin/tcb-matrix-init" in hooks
    assert "--no-index --find-links /tmp/wheels" in hooks


def test_a_new_build_removes_only_other_images_of_its_target_unused_for_a_day():
    r = recipe()
    now, day = 1_000_000.0, 24 * 3600
    last_used = {r.dirname: now - 2 * day, "6.1-0123456789abcdef": now - 2 * day,
                 "6.1-fedcba9876543210": now - 60, "6.12-0123456789abcdef": now - 2 * day,
                 "6.1-bullseye-0123456789abcdef": now - 2 * day}
    assert superseded(r, last_used, now) == ["6.1-0123456789abcdef"]


def test_image_size_leaves_a_gibibyte_free_and_is_whole_mebibytes():
    size = image_size_bytes(1000 * (1 << 20) + 5)
    assert size % (1 << 20) == 0 and size >= 1250 * (1 << 20) + (1 << 30)


def test_an_image_holds_exactly_one_kernel():
    assert kernel_version_of(["6.1.0-50-amd64"]) == "6.1.0-50-amd64"
    for dirs in ([], ["6.1.0-50-amd64", "6.1.0-57-amd64"]):
        with pytest.raises(ImageError):
            kernel_version_of(dirs)


def test_qemu_boots_the_image_on_an_overlay_with_the_run_directory_shared(tmp_path):
    image = Image(tmp_path / "img", "6.1.0-50-amd64", {})
    argv = kernels.qemu_argv(image, tmp_path / "share", "tcg")
    line = " ".join(argv)
    assert "snapshot=on" in line and "format=raw,if=virtio" in line
    assert f"path={tmp_path / 'share'},mount_tag=tcbshare" in line
    assert argv[argv.index("-kernel") + 1] == str(image.vmlinuz)
    assert "init=/usr/local/sbin/tcb-matrix-init" in argv[argv.index("-append") + 1]
    assert "tcg,thread=multi" in argv and "kvm" not in argv
    assert "kvm" in kernels.qemu_argv(image, tmp_path, "kvm")


def test_the_job_runs_doctor_then_every_group_with_its_limit_and_junit():
    groups = kernels.SELECTIONS["full"]
    job = kernels.job_script(groups)
    assert job.index("tcbypass doctor --json") < job.index("-m pytest")
    assert job.count("tcbypass doctor") == 1, "doctor runs once, as JSON"
    for g in groups:
        assert f'--junitxml="$out/{g.name}.xml"' in job
        assert f"timeout -k 15 {g.limit} " in job
        assert f"group-end {g.name}" in job


def test_the_job_exports_the_environment_it_is_given():
    job = kernels.job_script(kernels.SELECTIONS["ci"], {"TCBYPASS_TRAFFIC_SLOWDOWN": "20"})
    assert "export TCBYPASS_TRAFFIC_SLOWDOWN=20" in job
    assert "TCBYPASS_TRAFFIC_SLOWDOWN" not in kernels.job_script(kernels.SELECTIONS["ci"])


def test_guests_are_told_what_their_kernel_lacks_how_slow_they_are_and_to_use_the_kernel_datapath():
    dp = {"TCBYPASS_DATAPATH": "system"}
    assert kernels.guest_env("6.1.0-57-amd64", "tcg") == {"TCBYPASS_KERNEL_LACKS": "tcx",
                                                         "TCBYPASS_TRAFFIC_SLOWDOWN": "20", **dp}
    assert kernels.guest_env("5.10.0-46-amd64", "kvm") == {"TCBYPASS_KERNEL_LACKS": "tcx,memcg_accounting", **dp}
    assert kernels.guest_env("6.12.95+deb12-amd64", "kvm") == dp
    assert kernels.guest_env("5.4.0-1-amd64", "kvm") == {
        "TCBYPASS_KERNEL_LACKS": "tcx,redirect_peer,run_time_stats,memcg_accounting", **dp}


def test_features_expected_of_a_release_and_the_path_they_give():
    assert results.expected_features("6.1.0-57-amd64") == {"tcx": False, "redirect_peer": True,
                                                           "devmap_lookup": True, "run_time_stats": True,
                                                           "memcg_accounting": True}
    assert results.expected_features("5.10.0-46-amd64")["memcg_accounting"] is False
    assert results.expected_features("6.6.0")["tcx"] and results.expected_features("5.9.1")["redirect_peer"] is False
    assert results.expected_features("") == {}
    assert results.expected_path(results.expected_features("6.1.0-57-amd64")) == {"hook": "clsact",
                                                                                  "from_vm": "peer"}
    assert results.expected_path(results.expected_features("6.12.95+deb12-amd64")) == {"hook": "tcx",
                                                                                       "from_vm": "peer"}
    assert results.expected_path(results.expected_features("5.4.0")) == {"hook": "clsact", "from_vm": "redirect"}


def test_the_job_is_valid_shell(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(kernels.job_script(kernels.SELECTIONS["full"], {"A": "b c"}))
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


def test_every_selection_names_tests_that_exist():
    args = sorted({arg for groups in kernels.SELECTIONS.values() for g in groups for arg in g.args})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = proc.stdout
    for arg in args:
        assert arg.split("[")[0] in collected, arg
    # Both hooks of each hook-parametrized group are selected (on a kernel without tcx the tcx cases skip, declared).
    explicit = next(g for g in kernels.SELECTIONS["ci"] if g.name == "explicit")
    for arg in explicit.args:
        if "refused" not in arg:
            assert f"{arg.split('::')[1]}[tcx]" in collected and f"{arg.split('::')[1]}[clsact]" in collected


def test_junit_cases_carry_outcome_and_the_first_line_of_the_message():
    cases = results.parse_junit(JUNIT)
    assert [(c.nodeid, c.outcome) for c in cases] == [
        ("tests/datapath/test_verdicts.py::test_a_is_redirected", "passed"),
        ("tests/datapath/test_verdicts.py::test_b[x]", "failed"),
        ("tests/datapath/test_counters.py::test_c", "error"),
        ("tests/datapath/test_counters.py::test_d", "skipped"),
    ]
    assert cases[1].message == "AssertionError: assert (0, 'pass runt') == (7, 'redirect from_vm')"
    assert cases[1].seconds == 1.2


def test_a_crashed_cli_is_summarised_by_the_exception_that_ended_it():
    message = ("AssertionError: Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n"
               "    main()\nAttributeError: libbpf.so.0: undefined symbol: bpf_obj_get_opts\n\nassert 1 == 0")
    xml = JUNIT.replace('message="AssertionError: assert (0, \'pass runt\') == (7, \'redirect from_vm\')&#10;second line"',
                        'message="' + html.escape(message, quote=True).replace("\n", "&#10;") + '"')
    assert results.parse_junit(xml)[1].message == (
        "AssertionError: traceback ending in AttributeError: libbpf.so.0: undefined symbol: bpf_obj_get_opts")


def test_console_marks_give_exit_code_and_seconds_per_group():
    lines = ["noise", "TCB-MATRIX doctor-end 0 15230", "TCB-MATRIX group-start datapath",
             "TCB-MATRIX group-end datapath 1 93004\r", "TCB-MATRIX group-end no-loss 124 900000"]
    assert results.parse_marks(lines) == {"doctor": (0, 15.23), "datapath": (1, 93.004),
                                         "no-loss": (124, 900.0)}


DOCTOR_61 = {"ok": True, "kernel": "6.1.0-57-amd64",
             "features": {"tcx": False, "redirect_peer": True, "devmap_lookup": True, "run_time_stats": True,
                          "memcg_accounting": True},
             "path": {"hook": "clsact", "from_vm": "peer"},
             "checks": [{"name": "tcx links", "ok": False, "detail": "no", "fix": "", "required": False}]}


def test_collect_reads_junit_doctor_and_facts_and_flags_unfinished_groups(tmp_path):
    (tmp_path / "datapath.xml").write_text(JUNIT)
    (tmp_path / "doctor.json").write_text(json.dumps(DOCTOR_61))
    (tmp_path / "facts.json").write_text('{"uname": "6.1.0-57-amd64", "bcc": "0.26.0"}')
    groups = kernels.SELECTIONS["full"]
    result = results.collect("6.1", tmp_path, ["TCB-MATRIX group-end datapath 1 9000"], [g.name for g in groups],
                             accel="tcg")
    assert result.kernel == "6.1.0-57-amd64" and result.accel == "tcg"
    assert result.doctor == DOCTOR_61 and result.doctor_problems == []
    datapath, explicit = result.groups[0], result.groups[1]
    assert (datapath.rc, datapath.count("passed"), datapath.count("failed")) == (1, 1, 1) and not datapath.ok
    assert explicit.rc is None and "did not finish" in explicit.summary
    assert not result.ok
    assert json.loads(json.dumps(result.to_json()))["groups"][0]["ok"] is False
    assert (results.path_text(result), results.features_text(result)) == (
        "clsact, peer", "redirect_peer, devmap_lookup, run_time_stats, memcg_accounting; no tcx")


def test_a_doctor_without_json_is_a_problem_with_its_last_words(tmp_path):
    (tmp_path / "doctor.json").write_text("")
    (tmp_path / "doctor.err").write_text("Traceback (most recent call last):\nAttributeError: boom\n")
    doctor, error = results.read_doctor(tmp_path)
    assert doctor is None and "AttributeError: boom" in error
    r = results.KernelResult("6.1", kernel="6.1.0-57-amd64", doctor=doctor, doctor_error=error,
                             groups=(results.GroupResult("datapath", 0, 1.0, results.parse_junit(JUNIT)[:1]),))
    assert not r.ok and r.doctor_problems == [f"doctor printed no JSON: {error}"]


def test_a_probe_that_disagrees_with_the_release_or_a_failed_check_fails_the_kernel():
    ok_group = (results.GroupResult("datapath", 0, 1.0, results.parse_junit(JUNIT)[:1]),)
    good = results.KernelResult("6.1", kernel="6.1.0-57-amd64", doctor=DOCTOR_61, groups=ok_group)
    assert good.ok
    wrong = {**DOCTOR_61, "features": {**DOCTOR_61["features"], "tcx": True}, "path": {"hook": "tcx",
                                                                                         "from_vm": "peer"}}
    r = results.KernelResult("6.1", kernel="6.1.0-57-amd64", doctor=wrong, groups=ok_group)
    assert not r.ok and r.doctor_problems == [
        "doctor found tcx present; Linux 6.6+ has it",
        "doctor chose {'hook': 'tcx', 'from_vm': 'peer'}, not {'hook': 'clsact', 'from_vm': 'peer'}"]
    failed = {**DOCTOR_61, "checks": [{"name": "verifier", "ok": False, "detail": "refused", "required": True}]}
    r = results.KernelResult("6.1", kernel="6.1.0-57-amd64", doctor=failed, groups=ok_group)
    assert r.doctor_problems == ["doctor: verifier: refused"]


def test_skips_are_counted_with_their_reason_in_the_table():
    xml = JUNIT.replace('message="needs two CPUs"', 'message="no tcx: this kernel has none"')
    g = results.GroupResult("explicit", 1, 1.0, results.parse_junit(xml))
    assert results.tests_text(g) == "explicit: 1 passed, 1 failed, 1 error, 1 skipped (no tcx)"


def test_report_table_has_one_row_per_kernel_and_lists_failures():
    ok = results.GroupResult("datapath", 0, 90.0, results.parse_junit(JUNIT)[:1])
    bad = results.GroupResult("explicit", 1, 200.0, results.parse_junit(JUNIT)[1:2])
    doctor_510 = {**DOCTOR_61, "kernel": "5.10.0-46-amd64",
                  "features": {**DOCTOR_61["features"], "memcg_accounting": False}}
    runs = [results.KernelResult("6.1", kernel="6.1.0-57-amd64", accel="tcg", boot_seconds=14, doctor=DOCTOR_61,
                                 groups=(ok,)),
            results.KernelResult("5.10", kernel="5.10.0-46-amd64", accel="tcg", doctor=doctor_510, groups=(ok, bad))]
    table = results.markdown_table(runs).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| 6.1 (6.1.0-57-amd64) | clsact, peer | redirect_peer, devmap_lookup, "
                               "run_time_stats, memcg_accounting; no tcx | datapath: 1 passed | pass |")
    assert "FAIL: explicit 1 failed" in table[3]
    assert results.failures(runs) == [
        "5.10 tests/datapath/test_verdicts.py::test_b[x]: failed: "
        "AssertionError: assert (0, 'pass runt') == (7, 'redirect from_vm')"]


def test_unknown_kernel_or_selection_is_refused(tmp_path):
    with pytest.raises(kernels.MatrixError, match="unknown kernel 4.19"):
        kernels.run_matrix(["4.19"], "full", tmp_path)
    with pytest.raises(kernels.MatrixError, match="unknown selection"):
        kernels.run_matrix(["6.1"], "most", tmp_path)


def test_a_result_survives_its_json_and_the_report_reads_it_back(tmp_path, capsys):
    cases = results.parse_junit(JUNIT)
    result = results.KernelResult("6.1", kernel="6.1.0-57-amd64", accel="tcg", doctor=DOCTOR_61,
                                  groups=(results.GroupResult("datapath", 1, 12.5, cases),))
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result.to_json()))
    assert results.KernelResult.from_json(json.loads(path.read_text())) == result
    from click.testing import CliRunner

    from tcbypass_lab.cli import main

    proc = CliRunner().invoke(main, ["kernels", "--report", str(path)])
    assert proc.exit_code == 1
    out = proc.output
    assert "| 6.1 (6.1.0-57-amd64) | clsact, peer |" in out and "test_b[x]: failed" in out
