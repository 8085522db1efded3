"""Reading `vagrant up`'s output: pytest's summary line from the VM, as Vagrant
prefixes it, with or without pytest's "=" frame (pytest -q drops the frame when
there is nothing else to say, as in CI's one-test selection)."""

from __future__ import annotations

import pytest

from tcbypass_lab.vagrant import summary_line


@pytest.mark.parametrize("output, summary", [
    ("    default: .    [100%]\n    default: 1 passed in 37.30s\n  \n", "1 passed in 37.30s"),
    ("    default: ===== 2 failed, 1 passed in 64.58s (0:01:04) =====\n", "2 failed, 1 passed in 64.58s (0:01:04)"),
    ("default: 3 passed in 1.0s\ndefault: 1 failed, 2 passed in 9.5s\n", "1 failed, 2 passed in 9.5s"),
    ("    default: collected 0 items\n", ""),
])
def test_the_last_pytest_summary_is_found(output, summary):
    assert summary_line(output) == summary
