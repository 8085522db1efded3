"""Load the pods recorded by scripts/record-binding-snapshots.py (one VM of each binding,
built in the lab and read back from the kernel) as the values tcbypass passes around."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from tcbypass.netdev import Address, Link
from tcbypass.nftrules import NatRule
from tcbypass.ovsdb import Port
from tcbypass.podnet import PodNet, Process

DATA = pathlib.Path(__file__).parent / "data"


def _pod(d: dict) -> PodNet:
    return PodNet(
        path=d["path"],
        links={name: Link(**link) for name, link in d["links"].items()},
        addresses=tuple(Address(**a) for a in d["addresses"]),
        nat_rules=None if d["nat_rules"] is None else tuple(NatRule(**r) for r in d["nat_rules"]),
        sysctls=d["sysctls"],
        processes=None if d["processes"] is None else tuple(
            Process(p["pid"], p["comm"], tuple(p["args"])) for p in d["processes"]),
    )


def load() -> dict[str, tuple[Port, Link, PodNet]]:
    """vmi name -> (Kube-OVN port row, its device where OVS runs, the pod read deep)."""
    raw = json.loads((DATA / "binding_snapshots.json").read_text())
    return {name: (Port(**d["port"]), Link(**d["host"]), _pod(d["pod"])) for name, d in raw.items()}


def shallow(pod: PodNet) -> PodNet:
    """What a shallow read of the same pod gives: devices and addresses only."""
    return dataclasses.replace(pod, nat_rules=None, sysctls=None, processes=None)
