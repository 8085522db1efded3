"""From a VMI name to the tap/NIC pairs to bypass, the way Kube-OVN and
KubeVirt lay them out (shared/KUBEVIRT.md).

1. Kube-OVN's Interface rows with pod_name=<vmi> (the VM name for VM pods)
   and pod_namespace=<namespace>: one row per NIC, primary and secondary.
2. The pod NIC is the veth peer of the host port: the host port's IFLA_LINK,
   read where OVS runs, is the pod NIC's ifindex inside pod_netns. No name
   guessing, and no confusion with other veths whose ifindexes collide.
3. The pod NIC must be a port of a KubeVirt bridge (k6t-*), and that bridge
   must have exactly one other port: the VM's tap.
4. The VM's MAC: an `attached-mac` in the port's external_ids wins when
   present (it is what the OVN port's security is built from); otherwise the
   MAC of KubeVirt's dummy, which kept the pod's original MAC when KubeVirt
   gave that MAC to the VM (eth0 for eth0-nic, pod<hash> for <hash>-nic).

`plan_nic` is pure: it takes the rows and the device table already read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import AttachSpec
from .netdev import Link
from .ovsdb import Port

BRIDGE_PREFIX = "k6t-"
NIC_SUFFIX = "-nic"
VM_SIDE_KINDS = ("tun", "veth")  # a real tap, or a veth standing in for one in emulated pods


@dataclass(frozen=True)
class NicPlan:
    port: Port
    spec: AttachSpec | None
    reason: str = ""  # why this NIC cannot be bypassed

    @property
    def ok(self) -> bool:
        return self.spec is not None


def dummy_name(nic: str) -> str:
    """KubeVirt's dummy for a pod NIC: eth0-nic -> eth0, <hash>-nic -> pod<hash>."""
    base = nic[: -len(NIC_SUFFIX)] if nic.endswith(NIC_SUFFIX) else nic
    return base if base.startswith("eth") else f"pod{base}"


def plan_nic(port: Port, host: Link | None, links: dict[str, Link], dhcp_to_bridge: bool = True) -> NicPlan:
    """Decide whether one Kube-OVN port of a VM pod can be bypassed, and how.

    `host` is the port's device where OVS runs, `links` the devices in the pod.
    """
    def no(reason: str) -> NicPlan:
        return NicPlan(port, None, reason)

    if port.ifindex is None:
        return no(f"OVS has not resolved port {port.name} yet (no ifindex); try again in a moment")
    if host is None:
        return no(f"port {port.name} is in OVSDB but not on this node's network (pod being deleted?)")
    if host.kind != "veth" or not host.peer:
        return no(f"port {port.name} is a {host.kind or 'plain'} device, not a veth into the pod")
    by_index = {link.index: link for link in links.values()}
    nic = by_index.get(host.peer)
    if nic is None:
        return no(f"the peer of {port.name} is not in {port.pod_netns}")
    if nic.kind != "veth":
        return no(f"the pod side of {port.name} ({nic.name}) is not a veth")
    bridge = by_index.get(nic.master)
    if bridge is None:
        return no(f"{nic.name} is not a bridge port: masquerade or passt binding (or not plugged yet), "
                  "nothing to bypass")
    if bridge.kind != "bridge" or not bridge.name.startswith(BRIDGE_PREFIX):
        return no(f"{nic.name} is a port of {bridge.name}, not of a KubeVirt bridge ({BRIDGE_PREFIX}*)")
    ports = [link for link in links.values() if link.master == bridge.index and link.index != nic.index]
    if not ports:
        return no(f"bridge {bridge.name} has no tap yet (VM not started?)")
    if len(ports) > 1:
        return no(f"bridge {bridge.name} has {len(ports)} other ports ({', '.join(sorted(p.name for p in ports))}); "
                  "expected exactly one tap")
    tap = ports[0]
    if tap.kind not in VM_SIDE_KINDS:
        return no(f"the other port of {bridge.name}, {tap.name}, is a {tap.kind or 'plain'} device, not a tap")

    mac = port.external_ids.get("attached-mac", "")
    if not mac:
        dummy = links.get(dummy_name(nic.name))
        mac = dummy.mac if dummy is not None else ""
    if not mac:
        return no(f"cannot tell the VM's MAC: no attached-mac in OVSDB and no dummy {dummy_name(nic.name)} "
                  f"in {port.pod_netns}")

    spec = AttachSpec(name=port.iface_id or port.name, netns=port.pod_netns, tap=tap.name, nic=nic.name,
                      mac=mac, dhcp_to_bridge=dhcp_to_bridge, vmi=port.pod_name, namespace=port.pod_namespace,
                      iface_id=port.iface_id)
    return NicPlan(port, spec)
