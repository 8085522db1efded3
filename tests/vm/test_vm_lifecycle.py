"""A VM's whole life on the fast path, with a real guest (TCG where KVM does not work)
on two emulated nodes, each with its own Open vSwitch, bpffs, run directory and
`tcbypass agent`: live migration each way, a cancelled and a failed migration,
NIC hotplug and unplug, pause and resume (lab/tcbypass_lab/migration.py builds
the nodes as KubeVirt and Kube-OVN do; docs/hooks.md has the measured figures).
"""

from __future__ import annotations

import threading
import time

import pytest

from tcbypass_lab import migration as mig
from tcbypass_lab.streams import PingFlow

pytestmark = pytest.mark.root


@pytest.fixture
def cluster():
    with mig.cluster(agents=True) as c:
        yield c


def active(node, iface: str) -> bool:
    return any(r["iface_id"] == iface and r["state"] == "active" for r in node.statuses())


def counters(node, iface: str) -> dict:
    [row] = [r for r in node.statuses() if r["iface_id"] == iface]
    return row["counters"]


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n    [vm] {text}")


def test_a_live_migration_lands_on_the_targets_fast_path_each_way(cluster, capsys):
    c = cluster
    for node in (c.a, c.b):  # OVS's own count of the RARP QEMU announces the VM with
        node.sb.switch.ofctl("add-flow", "priority=300,rarp,actions=NORMAL")
    vm = mig.start_vm(c.a)
    try:
        assert mig.wait_for(lambda: active(c.a, vm.iface)) is not None, "the source attached by its agent"
        for port, (src, dst) in ((31000, (c.a, c.b)), (31010, (c.b, c.a))):
            rarp_before = dst.sb.switch.flow_packets("rarp")
            vm, r = mig.migrate(c, vm, port)
            report(capsys, f"migration {r.direction}: {r.total_s:.2f} s, QEMU downtime {r.downtime_ms} ms; target "
                           f"attached {r.target_attached_s:.3f} s after its pod was plugged; lost to the VM "
                           f"{r.to_vm['lost']}/{r.to_vm['sent']}, from it {r.from_vm['lost']}/{r.from_vm['sent']}, "
                           f"pings {r.ping['lost']}/{r.ping['sent']}")
            assert vm.node is dst
            assert r.target_attached_before_resume, "the target's NIC is attached before the VM resumes there"
            assert r.target_counters_moved, "after the switch-over the target's fast path carries the VM's traffic"
            assert r.source_detached and not src.pins(), "the source's attachment goes with the source pod"
            assert dst.sb.switch.flow_packets("rarp") > rarp_before, "QEMU's RARP reached the switch"
            assert counters(dst, vm.iface)["passed_packets"]["multicast"] > 0, "... through the bridge, as designed"
            assert r.ping["lost"] < r.ping["sent"] // 2 and r.from_vm["sent"] - r.from_vm["lost"] > 0
    finally:
        vm.guest.close()
    vm.node.sb.delete_pod(vm.nics)
    assert mig.wait_for(lambda: c.a.pins() == 0 and c.b.pins() == 0, 10) is not None, "nothing left on either node"


def test_a_cancelled_or_failed_migration_leaves_the_source_on_its_fast_path(cluster):
    c = cluster
    vm = mig.start_vm(c.a)
    try:
        assert mig.wait_for(lambda: active(c.a, vm.iface)) is not None
        with vm.guest.qmp() as q:
            q.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 20})  # slow: time to cancel it
        for port, how in ((31100, "cancel"), (31110, "fail")):
            nics, target = mig.plug_target(c.b, vm, f"{c.b.root}/migrate-{port}.sock")
            assert mig.wait_for(lambda: active(c.b, nics[0].iface_id)) is not None, "the target was attached"
            with vm.guest.qmp() as q:
                q.execute("migrate", uri=f"unix:{c.b.root}/migrate-{port}.sock")
                assert mig.wait_for(lambda: q.migration().get("status") == "active", 30, 0.05) is not None
                if how == "cancel":
                    q.execute("migrate_cancel")
                else:
                    target.close()  # the target's QEMU dies mid-way
                ended = q.wait_migration()["status"]
                assert ended == ("cancelled" if how == "cancel" else "failed")
                assert mig.wait_for(lambda: q.status() == "running", 30, 0.05) is not None
            target.close()
            c.b.sb.delete_pod(nics)  # KubeVirt deletes the target pod
            assert mig.wait_for(lambda: c.b.pins() == 0, 10) is not None, "the target pod's attachment went with it"
            assert active(c.a, vm.iface), "the source never left its fast path"
            before = counters(c.a, vm.iface)["redirected_packets"]
            rc, out = vm.guest.run(f"ping -c 5 -i 0.2 {mig.SERVER_IP}", timeout=60)
            after = counters(c.a, vm.iface)["redirected_packets"]
            assert rc == 0, out
            assert after["from_vm"] - before["from_vm"] >= 5 and after["to_vm"] - before["to_vm"] >= 5
    finally:
        vm.guest.close()


def test_a_hotplugged_nic_is_attached_and_unplugged_without_touching_the_running_one(cluster, capsys):
    c = cluster
    c.a.sb.add_server_pod("web2", "10.17.0.2", namespace=mig.NAMESPACE)  # the secondary network's peer
    vm = mig.start_vm(c.a)
    pinger = PingFlow(c.server, mig.VM_IP, 0.05, limit=300)
    try:
        assert mig.wait_for(lambda: active(c.a, vm.iface)) is not None
        primary = c.a.record(vm.iface)
        attaches = c.a.agent.metric("tcbypass_agent_attaches_total")
        pinger.start()
        time.sleep(1.0)

        plugged_wall = time.time()
        nic = c.a.sb.hotplug_nic(vm.nics, "10.17.0.5", "hot.mig.ovn")
        vm.guest.hotplug(nic.tap, nic.mac, "hot1")
        assert mig.wait_for(lambda: active(c.a, nic.iface_id)) is not None, "the hot-plugged NIC is attached"
        took = c.a.record(nic.iface_id).attached_at - plugged_wall
        rc, out = vm.guest.run("ip addr add 10.17.0.5/24 dev eth1 && ip link set eth1 up && "
                               "ping -c 5 -i 0.2 -I eth1 10.17.0.2", timeout=60)
        assert rc == 0, out
        assert counters(c.a, nic.iface_id)["redirected_packets"]["from_vm"] >= 5

        vm.guest.unplug("hot1")
        unplugged = time.monotonic()
        c.a.sb.unplug_nic(vm.nics, nic)
        assert mig.wait_for(lambda: c.a.record(nic.iface_id) is None, 10) is not None, "the unplugged NIC is detached"
        gone = time.monotonic() - unplugged
        time.sleep(1.0)
        pinger.finish()
        ping = pinger.result()
        report(capsys, f"hotplug: the agent attached the new NIC {took:.2f} s after Kube-OVN began plugging it; "
                       f"detached it {gone:.2f} s after virt-handler began removing its devices; pings to the "
                       f"running NIC {ping.lost} lost of {ping.transmitted}")
        assert ping.lost == 0, "the NIC that stays lost nothing"
        assert c.a.record(vm.iface) == primary, "the running NIC's attachment was not touched"
        assert c.a.agent.metric("tcbypass_agent_attaches_total") == attaches + 1
    finally:
        pinger.stop()
        vm.guest.close()


def test_pause_and_resume_leave_the_attachment_untouched(cluster):
    """virtctl pause: QEMU stops, the tap stays. No flapping to stale and back."""
    c = cluster
    vm = mig.start_vm(c.a)
    try:
        assert mig.wait_for(lambda: active(c.a, vm.iface)) is not None
        record = c.a.record(vm.iface)
        attaches = c.a.agent.metric("tcbypass_agent_attaches_total")
        seen, stop = [], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.extend(r["state"] for r in c.a.statuses() if r["iface_id"] == vm.iface)
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with vm.guest.qmp() as q:
            q.execute("stop")
            assert q.status() == "paused"
            time.sleep(3.0)
            q.execute("cont")
        time.sleep(1.0)
        stop.set()
        watcher.join()
        assert seen and set(seen) == {"active"}, f"states while paused: {sorted(set(seen))}"
        assert c.a.record(vm.iface) == record
        assert c.a.agent.metric("tcbypass_agent_attaches_total") == attaches
        rc, out = vm.guest.run(f"ping -c 3 -i 0.2 {mig.SERVER_IP}", timeout=60)
        assert rc == 0, out
    finally:
        vm.guest.close()
