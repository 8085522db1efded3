"""The Vagrant path for real: the box built here (tcbypass-lab box), `vagrant up`
with the libvirt provider on this machine (TCG where KVM does not work), the
selection running in the VM and passing, the results brought back, a failing
selection failing the provisioning, and `vagrant destroy -f` leaving nothing.

CI runs one integration test in the VM ($TCBYPASS_VAGRANT_TESTS chooses; the
Vagrantfile's default is three). The figures (box build, boot, provisioning)
are printed; README.md's "In Vagrant" section has them.
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET

import pytest

from tcbypass_lab import vagrant

pytestmark = pytest.mark.root

SELECTION = os.environ.get("TCBYPASS_VAGRANT_CI_TESTS",
                           "tests/integration/test_vmi.py::test_primary_nic_is_discovered_and_bypassed")


def test_vagrant_up_boots_the_local_box_runs_the_selection_and_destroy_leaves_nothing(capsys):
    started = vagrant.ensure_libvirt()
    try:
        vagrant.destroy()  # a VM an earlier, interrupted run left
        t0 = time.monotonic()
        up = vagrant.vagrant("up", env={"TCBYPASS_VAGRANT_TESTS": SELECTION}, timeout=3000)
        took_up = time.monotonic() - t0
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        summary = vagrant.summary_line(up.stdout)
        assert re.match(r"\d+ passed", summary), up.stdout[-3000:]
        junit = vagrant.vagrant("ssh", "-c", "cat /tmp/tcbypass-junit.xml", timeout=300)
        cases = list(ET.fromstring(junit.stdout).iter("testcase"))
        assert cases and all(not list(case) for case in cases), junit.stdout[-2000:]  # no failure, error or skip

        t1 = time.monotonic()
        failing = vagrant.vagrant("provision", env={"TCBYPASS_VAGRANT_TESTS": "tests/unit/test_cli.py -k no_such_test"},
                                  timeout=1800)
        took_failing = time.monotonic() - t1
        assert failing.returncode != 0, "a selection that fails must fail the provisioning, and so `vagrant up`"
    finally:
        left = vagrant.destroy()
        vagrant.stop(started)
    with capsys.disabled():
        print(f"\n    [vagrant] vagrant up (box, boot, provisioning, {len(cases)} test(s)): {took_up:.0f} s; "
              f"in the VM: {summary}; a failing selection failed the provisioning in {took_failing:.0f} s; "
              f"left after destroy: {left}")
    assert left.none, f"vagrant destroy -f left {left}"
