"""Maps are bounded: every map of an instance has a fixed size, a write past
it is a clear error, never a silent partial write, and no number of VM
restarts makes an attachment need more room or more objects."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from tcbypass import attachments, bpfsys
from tcbypass.errors import BpfError
from tcbypass.maps import CONFIG, META_SIZE, TEST_OUT, AttachmentMaps, config_entry, parse_mac
from tcbypass.model import AttachSpec
from tests.datapath.conftest import loaded_instance

from .conftest import assert_one_attachment_or_none, instance_ids, links, report

pytestmark = pytest.mark.root

VM_MAC, BRIDGE_MAC = parse_mac("0a:58:0a:10:00:05"), parse_mac("0a:58:0a:10:00:fe")


def test_every_map_of_an_instance_has_a_fixed_small_size(capsys):
    """One config entry, one slot per direction, one counter line per CPU, one record."""
    with loaded_instance() as inst:
        sizes = {}
        for name in sorted(os.listdir(inst.pin_dir)):
            if name.startswith("tcb_") and name not in ("tcb_from_vm", "tcb_to_vm", TEST_OUT):
                fd = bpfsys.obj_get(f"{inst.pin_dir}/{name}")
                try:
                    info = bpfsys.map_info(fd)
                finally:
                    os.close(fd)
                sizes[name] = (info.max_entries, info.value_size)
    assert sizes == {"tcb_config": (1, 28), "tcb_tap": (1, 4), "tcb_stats": (1, 96), "tcb_meta": (1, META_SIZE)}
    report(capsys, f"an instance's maps (entries, value bytes): {sizes}")


def test_config_has_one_entry_and_refuses_a_second_with_a_clear_error():
    with loaded_instance() as inst:
        entry = config_entry(VM_MAC, BRIDGE_MAC, bytes(6), 1, 5, 3)
        inst.maps.set_config(entry)
        with pytest.raises(OSError) as caught:
            bpfsys.map_update(inst.maps._fds[CONFIG], ctypes.c_uint32(1), entry)
        assert caught.value.errno == errno.E2BIG
        assert (inst.maps.config().tap_ifindex, inst.maps.config().nic_ifindex) == (5, 3), "entry 0 unchanged"


def test_oversized_record_is_refused_and_the_old_one_kept():
    with loaded_instance() as inst:
        inst.maps.write_record({"name": "kept"})
        with pytest.raises(BpfError, match="attachment record too large"):
            inst.maps.write_record({"name": "x" * META_SIZE})
        assert inst.maps.read_record() == {"name": "kept"}


def test_many_vm_restarts_keep_one_instance_of_the_same_objects(bare_node, capsys):
    """Each refresh points the same instance at the new tap: the same programs
    and maps, two links, nothing piling up in bpffs or the kernel."""
    sb = bare_node
    [nic] = sb.add_vm("vm1", ["10.16.0.5"])
    spec = AttachSpec(name=f"b-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic, mac=nic.mac)
    attachments.attach(spec)
    pin_dir = attachments.pin_dir_of(spec.name)
    first = instance_ids(pin_dir)
    entries = sorted(os.listdir(pin_dir))
    for _ in range(5):
        sb.restart_vm(nic)
        assert attachments.attach(spec).action == "refreshed"
    assert assert_one_attachment_or_none(spec.name, nic) == "active"
    assert instance_ids(pin_dir) == first, "the same programs and maps"
    assert sorted(os.listdir(pin_dir)) == entries, "the same pins: no link of an old tap left"
    with AttachmentMaps(pin_dir) as maps:
        config = maps.config()
        assert (config.tap_ifindex, config.nic_ifindex) == (links(nic.pod_ns)[nic.tap], links(nic.pod_ns)[nic.nic])
    report(capsys, f"after 5 VM restarts: {len(entries)} pins, programs {sorted(first.progs.values())}")
