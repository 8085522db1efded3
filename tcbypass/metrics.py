"""Prometheus metrics of the node's attachments, read from the pinned maps at scrape time."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import attachments
from .model import STATE_ACTIVE, STATE_ORPHANED, STATE_STALE, Status

LABELS = ["vmi", "namespace", "iface_id", "name"]


def _labels(s: Status) -> list[str]:
    r = s.record
    return [r.vmi, r.namespace, r.iface_id, r.name]


class AttachmentCollector(Collector):
    def __init__(self, statuses: Callable[[], list[Status]] = attachments.statuses, agent=None):
        self._statuses = statuses
        self._agent = agent

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


def registry(agent=None, statuses: Callable[[], list[Status]] = attachments.statuses) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AttachmentCollector(statuses, agent))
    return reg


def serve(address: str, reg: CollectorRegistry):
    """Serve /metrics on HOST:PORT in a background thread; returns the server."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=reg)
    return server
