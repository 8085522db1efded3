"""The kernel matrix inside the suite: the project's kernel-facing tests, run
in a qemu guest on another kernel (lab/tcbypass_lab/kernels.py).

By default this runs the "ci" selection on Debian 12's 6.1 kernel, the
subset that keeps the whole suite inside its time budget under TCG. Choose
others with TCBYPASS_KERNELS (comma-separated, e.g. "6.1,5.10") and
TCBYPASS_KERNEL_SELECTION ("full"); scripts/kernel-matrix.sh runs the whole
matrix. The first run on a machine builds the guest image (a few minutes);
later runs reuse it from /var/cache/tcbypass/kernels.

One guest boot per kernel serves every test of that kernel; each test then
checks one group's outcome and names every failed case with its message.
"""

from __future__ import annotations

import os

import pytest

from tcbypass_lab import kernel_results as results
from tcbypass_lab import kernels

pytestmark = pytest.mark.root

KERNELS = [k.strip() for k in os.environ.get("TCBYPASS_KERNELS", "6.1").split(",") if k.strip()]
SELECTION = os.environ.get("TCBYPASS_KERNEL_SELECTION", "ci")
GROUPS = kernels.SELECTIONS[SELECTION]


@pytest.fixture(scope="module", params=KERNELS)
def matrix(request, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the kernel matrix needs root (mmdebstrap, qemu): run the suite as root")
    target = kernels.targets()[request.param]
    result = kernels.run_kernel(target, GROUPS, tmp_path_factory.mktemp(f"kernel-{target.name}"))
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[kernels] {target.name}: {result.kernel or '?'} ({result.accel}), image build "
              f"{result.build_seconds:.0f} s, boot {result.boot_seconds:.0f} s, "
              + ", ".join(f"{g.name} {g.seconds:.0f} s: {g.summary}" for g in result.groups), flush=True)
    return result


def test_guest_boots_its_own_kernel_and_the_product_reports_on_it(matrix):
    assert not matrix.error, matrix.error
    assert matrix.kernel == matrix.image["kernel_version"], "the guest must run the kernel its headers are for"
    assert matrix.kernel.startswith(f"{matrix.target.split('-')[0]}."), matrix.kernel
    assert matrix.doctor is not None, f"tcbypass doctor --json printed no JSON: {matrix.doctor_error}"


def test_doctor_finds_what_the_kernel_has_and_chooses_its_best_path(matrix):
    """6.1 and 5.10: no tcx, so clsact, with bpf_redirect_peer from the VM; 6.6+: tcx.
    Whether the kernel types peer-redirected frames itself is reported too, but
    no release number predicts it (stable kernels took the change): only that
    doctor answered."""
    assert matrix.doctor is not None, matrix.doctor_error
    want = results.expected_features(matrix.kernel)
    assert {name: matrix.features.get(name) for name in want} == want, matrix.doctor
    assert isinstance(matrix.features.get("kernel_types_peer"), bool), matrix.doctor
    assert matrix.path == results.expected_path(matrix.features)
    assert not matrix.doctor_problems, matrix.doctor_problems


@pytest.mark.parametrize("group", [g.name for g in GROUPS])
def test_group_passes_in_the_guest(matrix, group):
    [result] = [g for g in matrix.groups if g.name == group]
    failed = [f"{c.nodeid}: {c.outcome}: {c.message}" for c in result.cases if c.outcome in ("failed", "error")]
    assert result.ok, f"{group} on {matrix.kernel or matrix.target}: {result.summary} {result.note}\n" + "\n".join(failed)
