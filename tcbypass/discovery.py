"""From a VMI name to the tap/NIC pairs to bypass, the way Kube-OVN and
KubeVirt lay them out (shared/KUBEVIRT.md).

1. Kube-OVN's Interface rows with pod_name=<vmi> (the VM name for VM pods)
   and pod_namespace=<namespace>: one row per NIC, primary and secondary.
2. The binding of each NIC is recognised from what is there (bindings.py):
   the pod NIC is the veth peer of the host port (the host port's IFLA_LINK,
   read where OVS runs, is the pod NIC's ifindex inside pod_netns; no name
   guessing), and only a pod NIC that shares a KubeVirt bridge (k6t-*) with
   exactly one tap, as the bridge and managedTap bindings build it, can be
   bypassed.
3. The VM's MAC: an `attached-mac` in the port's external_ids wins when
   present (it is what the OVN port's security is built from); otherwise the
   MAC of KubeVirt's dummy, which kept the pod's original MAC when KubeVirt
   gave that MAC to the VM (eth0 for eth0-nic, pod<hash> for <hash>-nic).

`plan_nic` is pure: it takes the rows and the devices already read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import bindings
from .bindings import Recognition
from .model import AttachSpec
from .netdev import Link
from .ovsdb import Port
from .podnet import PodNet

NIC_SUFFIX = "-nic"


@dataclass(frozen=True)
class NicPlan:
    port: Port
    spec: AttachSpec | None
    recognition: Recognition

    @property
    def ok(self) -> bool:
        return self.spec is not None

    @property
    def reason(self) -> str:
        return self.recognition.reason

    @property
    def healthy(self) -> bool:
        """Bypassable, or a healthy binding that has nothing to bypass."""
        return self.ok or self.recognition.outcome == bindings.BY_DESIGN

    @property
    def label(self) -> str:
        return self.port.iface_id or self.port.name


def dummy_name(nic: str) -> str:
    """KubeVirt's dummy for a pod NIC: eth0-nic -> eth0, <hash>-nic -> pod<hash>."""
    base = nic[: -len(NIC_SUFFIX)] if nic.endswith(NIC_SUFFIX) else nic
    return base if base.startswith("eth") else f"pod{base}"


def plan_nic(port: Port, host: Link | None, pod: PodNet, dhcp_to_bridge: bool = True) -> NicPlan:
    """Decide whether one Kube-OVN port of a VM pod can be bypassed, and how.

    `host` is the port's device where OVS runs, `pod` what is in the pod's namespace.
    """
    found = bindings.recognise(port, host, pod)
    if found.outcome != bindings.BYPASSABLE:
        return NicPlan(port, None, found)
    mac = port.external_ids.get("attached-mac", "")
    if not mac:
        dummy = pod.links.get(dummy_name(found.nic))
        mac = dummy.mac if dummy is not None else ""
    if not mac:
        return NicPlan(port, None, dataclasses.replace(
            found, outcome=bindings.UNEXPECTED,
            reason=f"cannot tell the VM's MAC: no attached-mac in OVSDB and no dummy {dummy_name(found.nic)} "
                   f"in {port.pod_netns}"))
    spec = AttachSpec(name=port.iface_id or port.name, netns=port.pod_netns, tap=found.tap, nic=found.nic,
                      mac=mac, dhcp_to_bridge=dhcp_to_bridge, vmi=port.pod_name, namespace=port.pod_namespace,
                      iface_id=port.iface_id)
    return NicPlan(port, spec, found)
