"""Maps are bounded: a full map is a clear error, never a silent partial
write, and attach never needs more room than the maps have."""

from __future__ import annotations

import errno

import pytest

from tcbypass import attachments, loader
from tcbypass.errors import BpfError
from tcbypass.maps import META_SIZE, AttachmentMaps, Direction, parse_mac, port_entry
from tcbypass.model import AttachSpec
from tests.datapath.conftest import compiled_instance

from .conftest import assert_one_attachment_or_none, links, report

pytestmark = pytest.mark.root

VM_MAC, BRIDGE_MAC = parse_mac("0a:58:0a:10:00:05"), parse_mac("0a:58:0a:10:00:fe")


def entry(direction: Direction = Direction.FROM_VM, flags: int = 0):
    return port_entry(VM_MAC, BRIDGE_MAC, direction, flags)


def test_full_port_map_refuses_a_new_entry_with_a_clear_error(capsys):
    with compiled_instance() as inst:
        maps = inst.maps
        for ifindex in range(101, 101 + loader.MAX_PORTS):
            maps.set_port(ifindex, entry())
        with pytest.raises(BpfError) as caught:
            maps.set_port(999, entry())
        assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.E2BIG
        assert "cannot write tcb_ports[999]" in str(caught.value) and "the map is full" in str(caught.value)
        assert sorted(maps.port_ifindexes()) == list(range(101, 101 + loader.MAX_PORTS)), "nothing else changed"
        assert all(bytes(maps.port(i).vm_mac) == VM_MAC for i in maps.port_ifindexes())
        maps.set_port(101, entry(Direction.TO_VM, flags=1))  # a full map still takes updates of its own keys
        assert (maps.port(101).dir, maps.port(101).flags) == (Direction.TO_VM, 1)
        report(capsys, f"tcb_ports holds {loader.MAX_PORTS} entries; the next one: {caught.value}")


def test_oversized_record_is_refused_and_the_old_one_kept():
    with compiled_instance() as inst:
        inst.maps.write_record({"name": "kept"})
        with pytest.raises(BpfError, match="attachment record too large"):
            inst.maps.write_record({"name": "x" * META_SIZE})
        assert inst.maps.read_record() == {"name": "kept"}


def test_attach_after_a_vm_restart_fits_a_map_full_of_old_entries(bare_node):
    """tcb_ports full of leftovers (earlier taps of the VM): the refresh drops
    them before it writes the new tap, so it never needs a fifth slot and
    never stops half way."""
    sb = bare_node
    [nic] = sb.add_vm("vm1", ["10.16.0.5"])
    spec = AttachSpec(name=f"b-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic, mac=nic.mac)
    attachments.attach(spec)
    with AttachmentMaps(attachments.pin_dir_of(spec.name)) as maps:
        for ifindex in range(9001, 9001 + loader.MAX_PORTS - 2):
            maps.set_port(ifindex, entry())
        assert len(maps.port_ifindexes()) == loader.MAX_PORTS
    sb.restart_vm(nic)
    result = attachments.attach(spec)
    assert result.action == "refreshed"
    assert assert_one_attachment_or_none(spec.name, nic) == "active"
    with AttachmentMaps(attachments.pin_dir_of(spec.name)) as maps:
        assert set(maps.port_ifindexes()) == {links(nic.pod_ns)[nic.tap], links(nic.pod_ns)[nic.nic]}
