"""The guest's pure helpers: module order, the READY line, the command line and the DHCP config."""

from __future__ import annotations

import pytest

from tcbypass_lab.dhcp import udhcpd_config
from tcbypass_lab.guest import GuestError, NicAddress, encode_command, kernel_cmdline, parse_ready_line
from tcbypass_lab.initramfs import resolve_module_order

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def test_modules_load_dependencies_first_each_once():
    order = [name for name, _ in resolve_module_order(MODULES_DEP, "", ["virtio_net", "virtio"])]
    assert order == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net"]


def test_builtin_modules_are_skipped_and_unknown_ones_refused():
    builtin = "kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\n"
    assert [n for n, _ in resolve_module_order(MODULES_DEP, builtin, ["virtio"])] == []
    with pytest.raises(GuestError, match="neither in modules.dep nor built in"):
        resolve_module_order(MODULES_DEP, "", ["e1000"])


def test_ready_line_names_each_nic_and_how_it_got_its_address():
    nics = parse_ready_line("[  5.1] TCB-GUEST-READY eth0=dhcp:10.16.0.5/24@169.254.75.10 eth1=none")
    assert nics == (NicAddress("eth0", "dhcp", "10.16.0.5/24", "169.254.75.10"), NicAddress("eth1", "none"))
    assert parse_ready_line("just boot noise") is None


def test_kernel_cmdline_carries_static_addresses_and_refuses_nonsense():
    line = kernel_cmdline(2, {"eth1": "10.17.0.6/24:10.17.0.1"})
    assert "console=ttyS0" in line and "tcb.nics=2" in line and "tcb.ip=eth1:10.17.0.6/24:10.17.0.1" in line
    with pytest.raises(ValueError):
        kernel_cmdline(1, {"eth0": "not-an-address"})


def test_commands_travel_base64_on_one_line():
    line = encode_command("t7", "echo 'a b' | wc -c\nexit 3", 30)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.startswith(b"t7 30 ")


def test_dhcp_config_serves_exactly_the_vm_address_to_the_vm_mac(tmp_path):
    text = udhcpd_config("k6t-eth0", "0a:00:00:00:00:05", "10.16.0.5", 24, str(tmp_path))
    assert "interface k6t-eth0" in text
    assert "static_lease 0a:00:00:00:00:05 10.16.0.5" in text
    assert "start 10.16.0.5" in text and "end 10.16.0.5" in text
    with pytest.raises(GuestError):
        udhcpd_config("k6t-eth0", "not-a-mac", "10.16.0.5", 24, str(tmp_path))
