#!/usr/bin/env python3
"""Record what tcbypass reads for one VM of each KubeVirt binding, for the unit tests.

Builds a sandbox (private OVS, namespaces; see lab/tcbypass_lab/wirings.py), reads
each VM port the way `status --all` does (OVSDB row, OVS-side device, deep pod
snapshot) and writes it to tests/unit/data/binding_snapshots.json, plus the
raw nftables expressions of the masquerade pod to nft_masquerade_rules.json.
Run as root from the repository root; it removes everything it built.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from tcbypass import netdev, nftrules, netns, ovsdb, podnet
from tcbypass_lab import wirings
from tcbypass_lab.sandbox import Sandbox

OUT = "tests/unit/data"


def main() -> int:
    with Sandbox() as sb:
        pods = [
            wirings.bridge_vm(sb, "vm-bridge", "10.16.0.11", "prod"),
            wirings.bridge_vm(sb, "vm-mtap", "10.16.0.12", "prod", managed_tap=True),
            wirings.masquerade_vm(sb, "vm-masq", "10.16.0.13", "fd00:10:16::13", "prod"),
            wirings.passt_vm(sb, "vm-passt", "10.16.0.14", "prod"),
            wirings.slirp_vm(sb, "vm-slirp", "10.16.0.20", "prod"),
            wirings.macvtap_vm(sb, "vm-mvtap", "10.16.0.15", "prod"),
            wirings.sriov_vm(sb, "vm-sriov", "10.16.0.16", "prod"),
            wirings.kubeovn_tap_vm(sb, "vm-direct", "10.16.0.17", "prod"),
            wirings.pending_vm(sb, "vm-pending", "10.16.0.18", "prod"),
            wirings.bridge_vm_with_two_taps(sb, "vm-2taps", "10.16.0.19", "prod"),
        ]
        sb.add_server_pod("web", "10.16.0.2", namespace="prod")
        ports = {p.pod_name: p for p in ovsdb.kubeovn_ports(sb.ovsdb_url)}
        with netdev.open_netns(sb.netns_path(sb.node)) as ipr:
            host = netdev.list_links(ipr)
        processes = podnet.processes_by_netns()
        snapshots = {}
        for name in [p.vmi for p in pods] + ["web"]:
            port = ports[name]
            pod = podnet.deepen(podnet.read(port.pod_netns), processes)
            snapshots[name] = {
                "port": dataclasses.asdict(port),
                "host": dataclasses.asdict(host[port.name]),
                "pod": dataclasses.asdict(pod),
            }
        raw = netns.run_in(ports["vm-masq"].pod_netns, _raw_rules)
    with open(f"{OUT}/binding_snapshots.json", "w") as f:
        json.dump(snapshots, f, indent=1, sort_keys=True)
    with open(f"{OUT}/nft_masquerade_rules.json", "w") as f:
        json.dump(raw, f, indent=1)
    print(f"wrote {OUT}/binding_snapshots.json and {OUT}/nft_masquerade_rules.json")
    return 0


def _raw_rules() -> list[dict]:
    from pyroute2.nftables.main import NFTables

    with NFTables(nfgen_family=nftrules.NFPROTO_UNSPEC) as nft:
        return [{"family": nftrules.FAMILIES[msg["nfgen_family"]], "table": msg.get_attr("NFTA_RULE_TABLE"),
                 "chain": msg.get_attr("NFTA_RULE_CHAIN"), "expressions": nftrules.expressions(msg)}
                for msg in nft.get_rules()]


if __name__ == "__main__":
    sys.exit(main())
