"""What the CLI asks of the node, in one object.

The CLI holds a backend in its App and calls nothing else that touches the
kernel or OVSDB, for every command (attach, detach, status, gc, agent,
doctor, prepare); unit tests give it a fake with the same methods and drive
the CLI through click's CliRunner without root.
"""

from __future__ import annotations

import logging
import os

from typing import TYPE_CHECKING

from .errors import NotRootError
from .model import AttachResult, AttachSpec, Record, Status

if TYPE_CHECKING:
    from . import discovery, doctor, nodeview, vmi

# The core (netlink, bpf) is imported by the methods that use it, so that the
# CLI's --help and --version start without it.


class NodeBackend:
    def require_root(self, what: str) -> None:
        if os.geteuid() != 0:
            raise NotRootError(f"tcbypass {what} needs root (CAP_BPF, CAP_NET_ADMIN, bpffs)",
                               hint=f"run: sudo tcbypass {what} ...")

    def attach_explicit(self, spec: AttachSpec) -> AttachResult:
        from . import attachments

        return attachments.attach(spec)

    def attach_vmi(self, name: str, namespace: str, settings: "discovery.Settings", dhcp_to_bridge: bool,
                   hook: str = "", from_vm: str = "") -> "vmi.VmiResult":
        from . import vmi

        return vmi.attach_vmi(name, namespace, settings, dhcp_to_bridge, hook=hook, from_vm=from_vm)

    def detach(self, target: str, namespace: str, remove_qdisc: bool = False) -> list[Record]:
        from . import vmi

        return vmi.detach_target(target, namespace, remove_qdisc)

    def gc(self) -> list[str]:
        from . import health

        return health.gc()

    def statuses(self, namespace: str | None, name: str | None) -> list[Status]:
        from . import health

        return health.statuses(namespace, name)

    def node_ports(self, namespace: str | None, settings: "discovery.Settings") -> "list[nodeview.PortRow]":
        from . import nodeview

        return nodeview.node_ports(settings, namespace)

    def doctor(self) -> "doctor.Report":
        from . import doctor

        return doctor.run()

    def prepare(self, cache_dir: str | None) -> list:
        """(build, path) of every program build now in the cache."""
        from pathlib import Path

        from . import build

        return build.prepare(Path(cache_dir) if cache_dir else None)

    def agent(self, settings: "discovery.Settings", detach_on_exit: bool, metrics_address: str,
              ports_refresh: float) -> None:
        """Run the agent until SIGTERM; metrics on `metrics_address` unless it is ''.
        OSError or ValueError when the metrics address cannot be served."""
        from .agent import Agent

        worker = Agent(settings, detach_on_exit=detach_on_exit)
        worker.install_signal_handlers()
        if metrics_address:
            from . import metrics

            metrics.serve(metrics_address, metrics.registry(worker, ports_refresh=ports_refresh))
            logging.getLogger(__name__).info("metrics on http://%s/metrics", metrics_address)
        worker.run()
