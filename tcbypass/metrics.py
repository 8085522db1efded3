"""Prometheus metrics of the node's attachments, read from the pinned maps at scrape time,
and of the node's VM ports by binding and fast-path state (nodeview.py)."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import attachments, bindings, nodeview
from .errors import TcbError
from .model import STATE_ACTIVE, STATE_ORPHANED, STATE_STALE, Status

log = logging.getLogger(__name__)

LABELS = ["vmi", "namespace", "iface_id", "name"]


def _labels(s: Status) -> list[str]:
    r = s.record
    return [r.vmi, r.namespace, r.iface_id, r.name]


def vm_ports_gauge(port_rows: list[nodeview.PortRow]) -> GaugeMetricFamily:
    """VM ports by binding and state; every pair is present (0 when none), so dashboards need no absent()."""
    gauge = GaugeMetricFamily("tcbypass_vm_ports", "Kube-OVN VM ports on this node by KubeVirt binding and "
                              "fast-path state.", labels=["binding", "state"])
    seen = nodeview.counts(port_rows)
    for binding in bindings.BINDINGS + (nodeview.NO_BINDING,):
        for state in nodeview.STATES:
            gauge.add_metric([binding, state], float(seen.get((binding, state), 0)))
    return gauge


class AttachmentCollector(Collector):
    def __init__(self, statuses: Callable[[], list[Status]] = attachments.statuses, agent=None,
                 ports: Callable[[], list[nodeview.PortRow]] | None = None):
        self._statuses = statuses
        self._agent = agent
        self._ports = ports

    def collect(self) -> Iterable:
        rows = self._statuses()
        packets = CounterMetricFamily("tcbypass_redirected_packets", "Frames carried by the fast path.",
                                      labels=LABELS + ["direction"])
        octets = CounterMetricFamily("tcbypass_redirected_bytes", "Bytes carried by the fast path.",
                                     labels=LABELS + ["direction"])
        passed = CounterMetricFamily("tcbypass_passed_packets", "Frames left to the bridge, by reason.",
                                     labels=LABELS + ["reason"])
        state = GaugeMetricFamily("tcbypass_attachment_state", "1 for the attachment's current state.",
                                  labels=LABELS + ["state"])
        for s in rows:
            base = _labels(s)
            for direction, value in s.counters.redirect_packets.items():
                packets.add_metric(base + [direction], value)
            for direction, value in s.counters.redirect_bytes.items():
                octets.add_metric(base + [direction], value)
            for reason, value in s.counters.passed.items():
                passed.add_metric(base + [reason], value)
            for name in (STATE_ACTIVE, STATE_STALE, STATE_ORPHANED):
                state.add_metric(base + [name], 1.0 if s.state == name else 0.0)
        yield from (packets, octets, passed, state)
        if self._ports is not None:
            try:
                yield vm_ports_gauge(self._ports())
            except TcbError as exc:
                log.warning("cannot count the VM ports for tcbypass_vm_ports: %s", exc)
        if self._agent is not None:
            st = self._agent.stats
            for metric, help_text, value in (
                    ("tcbypass_agent_reconciles", "VMI reconciliations run.", st.reconciles),
                    ("tcbypass_agent_attaches", "Attachments made or refreshed.", st.attaches),
                    ("tcbypass_agent_detaches", "Attachments removed.", st.detaches),
                    ("tcbypass_agent_failures", "Failed attach attempts (retried).", st.failures),
                    ("tcbypass_agent_ovsdb_connects", "OVSDB (re)connections.", st.ovsdb_connects)):
                c = CounterMetricFamily(metric, help_text)
                c.add_metric([], value)
                yield c


def registry(agent=None, statuses: Callable[[], list[Status]] = attachments.statuses,
             ports: Callable[[], list[nodeview.PortRow]] | None = None) -> CollectorRegistry:
    """`ports` defaults to the agent's node-wide view when an agent is given."""
    if ports is None and agent is not None:
        ports = agent.node_ports
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AttachmentCollector(statuses, agent, ports))
    return reg


def serve(address: str, reg: CollectorRegistry):
    """Serve /metrics on HOST:PORT in a background thread; returns the server."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=reg)
    return server
