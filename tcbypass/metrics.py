"""Prometheus metrics of the node's attachments, read from the pinned maps at scrape time,
and of the node's VM ports by binding and fast-path state (nodeview.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import bindings, health, nodeview
from .errors import TcbError
from .model import STATE_ACTIVE, STATE_ORPHANED, STATE_STALE, Status

log = logging.getLogger(__name__)

LABELS = ["vmi", "namespace", "iface_id", "name"]


def _labels(s: Status) -> list[str]:
    r = s.record
    return [r.vmi, r.namespace, r.iface_id, r.name]


PORTS_REFRESH = 15.0  # seconds between two surveys of every pod for tcbypass_vm_ports


class CachedPorts:
    """The node-wide view for scrapes, surveyed in a background thread at most every `refresh` seconds.

    A survey reads every pod (about 20 ms each on a small machine); a scrape, and the
    liveness probe that GETs /metrics with Kubernetes' 1 s default timeout, must not
    wait for it. Returns None until the first survey is done, and after one failed
    (rows from before the failure would be stale without saying so).
    """

    def __init__(self, compute: Callable[[], list[nodeview.PortRow]], refresh: float = PORTS_REFRESH):
        self._compute = compute
        self._refresh = refresh
        self._lock = threading.Lock()
        self._rows: list[nodeview.PortRow] | None = None
        self._at: float | None = None  # when the last survey started
        self._thread: threading.Thread | None = None

    def __call__(self) -> list[nodeview.PortRow] | None:
        with self._lock:
            due = self._at is None or time.monotonic() - self._at >= self._refresh
            if due and (self._thread is None or not self._thread.is_alive()):
                self._at = time.monotonic()
                self._thread = threading.Thread(target=self._survey, name="tcbypass-vm-ports", daemon=True)
                self._thread.start()
            return self._rows

    def _survey(self) -> None:
        try:
            rows = self._compute()
        except TcbError as exc:
            log.warning("cannot count the VM ports for tcbypass_vm_ports: %s", exc)
            rows = None
        except Exception:  # a bug must not kill the thread silently and freeze the gauge
            log.exception("surveying the VM ports failed")
            rows = None
        with self._lock:
            self._rows = rows

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a survey under way (tests)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


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
    def __init__(self, statuses: Callable[[], list[Status]] = health.statuses, agent=None,
                 ports: Callable[[], list[nodeview.PortRow] | None] | None = None):
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
                port_rows = self._ports()
            except TcbError as exc:
                log.warning("cannot count the VM ports for tcbypass_vm_ports: %s", exc)
                port_rows = None
            if port_rows is not None:
                yield vm_ports_gauge(port_rows)
        if self._agent is not None:
            st = self._agent.stats
            for metric, help_text, value in (
                    ("tcbypass_agent_reconciles", "VMI reconciliations run.", st.reconciles),
                    ("tcbypass_agent_attaches", "Attachments made or refreshed.", st.attaches),
                    ("tcbypass_agent_detaches", "Attachments removed.", st.detaches),
                    ("tcbypass_agent_failures", "Failed attach or detach attempts (retried).", st.failures),
                    ("tcbypass_agent_pods_gone", "Pods that went away while being reconciled (not an error).",
                     st.gone),
                    ("tcbypass_agent_unexpected_errors", "Exceptions no code path expected (bugs: logged, the "
                     "VMI retried, the agent goes on).", st.unexpected),
                    ("tcbypass_agent_ovsdb_connects", "OVSDB (re)connections.", st.ovsdb_connects)):
                c = CounterMetricFamily(metric, help_text)
                c.add_metric([], value)
                yield c
            up = GaugeMetricFamily("tcbypass_agent_ovsdb_up", "1 while the agent holds an OVSDB session (the fast "
                                   "path runs either way; pods plugged meanwhile wait for it).")
            up.add_metric([], 1.0 if st.ovsdb_up else 0.0)
            yield up


def registry(agent=None, statuses: Callable[[], list[Status]] = health.statuses,
             ports: Callable[[], list[nodeview.PortRow] | None] | None = None,
             ports_refresh: float = PORTS_REFRESH) -> CollectorRegistry:
    """`ports` defaults to the agent's node-wide view, surveyed in the background, when an agent is given."""
    if ports is None and agent is not None:
        ports = CachedPorts(agent.node_ports, ports_refresh)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AttachmentCollector(statuses, agent, ports))
    return reg


def serve(address: str, reg: CollectorRegistry):
    """Serve /metrics on HOST:PORT in a background thread; returns the server."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=reg)
    return server
