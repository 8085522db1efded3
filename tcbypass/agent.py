"""`tcbypass agent`: keep every Kube-OVN VM port on this node bypassed.

Event driven, no polling loop:
- an OVSDB `monitor` of the Interface table tells when Kube-OVN plugs or
  unplugs a pod NIC (and, after a reconnect, the whole current state);
- one rtnetlink socket per pod network namespace, subscribed to link events,
  tells when virt-handler builds the bridge and tap after the CNI ran, and
  when a VM restart replaces the tap.

Each event marks a VMI dirty; dirty VMIs are reconciled with `attach_vmi`
(idempotent: unchanged, refreshed or attached) after a short debounce. A
VMI whose port rows are gone is detached. Pods that are not bypassable
(ordinary pods, masquerade) are remembered and looked at again only when
their devices change.

Nothing a pod does ends the loop. A pod, device or namespace that vanishes
at any step is "already gone" (pods end that way every day). Any other
exception is a bug: it is logged with its traceback once per kind and
place, counted (tcbypass_agent_unexpected_errors_total), and that VMI is
retried with backoff while the agent goes on serving the others. OVSDB
going away is logged once when it goes and once when it is back
(tcbypass_agent_ovsdb_up says which); meanwhile the fast path keeps
running and link events are still served, and the monitor's initial state
after the reconnect catches up with every pod plugged or deleted meanwhile.

SIGTERM/SIGINT stop the loop and leave the datapath as it is (the programs
and pins stay and keep carrying traffic), or detach everything the agent
manages with `detach_on_exit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
import traceback
from dataclasses import dataclass

from . import attachments, build, features, health, netns, nodeview, ovsdb
from .errors import NetnsError, NotBypassableError, OvsdbError, TcbError, UnknownVmiError
from .discovery import Settings
from .vmi import attach_vmi, detach_vmi

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
DEBOUNCE = 0.05  # seconds to gather a burst of link events before reconciling
RETRY = (0.2, 5.0)  # backoff bounds for failed reconciles and OVSDB reconnects


@dataclass
class AgentStats:
    reconciles: int = 0
    attaches: int = 0
    detaches: int = 0
    failures: int = 0  # attaches and detaches that failed for a reason we know (retried)
    gone: int = 0  # VMIs whose pod vanished under a reconcile (the normal end of a pod)
    unexpected: int = 0  # exceptions nothing expected: bugs (logged, retried)
    ovsdb_connects: int = 0
    ovsdb_up: bool = False
    ovsdb_down_since: float | None = None  # time.monotonic() when it went away


def _link_events_socket(path: str) -> socket.socket:
    """A netlink socket inside the namespace at `path` that wakes up on link changes."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
        return sock
    return netns.run_in(path, make)


def _wait_readable(readers: list, timeout: float | None) -> list:
    """The readers (fds or sockets) that became readable within `timeout`
    seconds. poll(2), not select(2): a node with a thousand pods holds more
    sockets than select's FD_SETSIZE allows."""
    poller, by_fd = select.poll(), {}
    for reader in readers:
        fd = reader if isinstance(reader, int) else reader.fileno()
        poller.register(fd, select.POLLIN)
        by_fd[fd] = reader
    return [by_fd[fd] for fd, _ in poller.poll(None if timeout is None else max(0, timeout) * 1000)]


class Agent:
    def __init__(self, settings: Settings, detach_on_exit: bool = False, debounce: float = DEBOUNCE):
        self.settings = settings
        self.detach_on_exit = detach_on_exit
        self.debounce = debounce
        self.stats = AgentStats()
        self._stop = False
        self._ports: dict[str, ovsdb.Port] = {}  # OVSDB row uuid -> Kube-OVN port
        self._watch: dict[str, socket.socket] = {}  # pod netns path -> link-event socket
        self._dirty: dict[tuple[str, str], float] = {}  # (namespace, vmi) -> when it became dirty
        self._retry_at: dict[tuple[str, str], float] = {}
        self._backoff: dict[tuple[str, str], float] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_fd_set = False
        self._tracebacks_logged: set[tuple[str, str]] = set()  # (exception type, where) already logged in full

    # --- lifecycle -------------------------------------------------------------
    def stop(self, *_args) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        # The kernel may hand a signal to any thread (the metrics server's, say); Python runs the
        # handler only when the main thread wakes up. This fd wakes the event loop at once.
        signal.set_wakeup_fd(self._wake_w)
        self._wakeup_fd_set = True

    def run(self) -> None:
        """Serve until stopped; reconnect to OVSDB whenever it goes away."""
        self._warm_up()
        delay = RETRY[0]
        try:
            while not self._stop:
                try:
                    with ovsdb.Connection(self.settings.url, self.settings.ovsdb_timeout) as conn:
                        self._ovsdb_is_up()
                        delay = RETRY[0]
                        self._serve(conn)
                except OvsdbError as exc:
                    self._ovsdb_is_down(exc.message, delay)
                except Exception as exc:  # a bug in serving the connection: reconnect, never exit
                    self._unexpected("the OVSDB session", exc)
                if not self._stop:
                    self._serve_links_for(delay)
                    delay = min(delay * 2, RETRY[1])
        finally:
            self._shutdown()

    def _ovsdb_is_up(self) -> None:
        self.stats.ovsdb_connects += 1
        if self.stats.ovsdb_down_since is not None:
            log.warning("OVSDB at %s is back after %.1f s; catching up", self.settings.url,
                        time.monotonic() - self.stats.ovsdb_down_since)
        else:
            log.info("connected to OVSDB at %s", self.settings.url)
        self.stats.ovsdb_up, self.stats.ovsdb_down_since = True, None

    def _ovsdb_is_down(self, why: str, delay: float) -> None:
        """Say so once, when it goes; the retries are silent (tcbypass_agent_ovsdb_up says it)."""
        if self._stop:
            return
        if self.stats.ovsdb_down_since is None:
            self.stats.ovsdb_down_since = time.monotonic()
            log.warning("OVSDB: %s; the fast path keeps running, retrying with backoff (up to %.0f s apart)",
                        why, RETRY[1])
        else:
            log.debug("OVSDB still away (%s); next try in %.1f s", why, delay)
        self.stats.ovsdb_up = False

    def _serve_links_for(self, seconds: float) -> None:
        """Wait before reconnecting to OVSDB, serving link events and retries
        meanwhile (from the port rows the monitor last showed): a VM that
        restarts while OVSDB is away is still refreshed."""
        deadline = time.monotonic() + seconds
        while not self._stop and (left := deadline - time.monotonic()) > 0:
            self._turn(None, left)

    def _warm_up(self) -> None:
        """Have the program's compiled object ready before the first VM comes:
        from the cache (a prepared node) or compiled now, once, so that no
        attach waits for a compiler. A failure here is logged; attaches then
        report it themselves."""
        try:
            found = features.probe()
            build.get(build.Build(no_peer=not found.redirect_peer))
        except TcbError as exc:
            log.warning("cannot prepare the program: %s", exc)

    def _sleep(self, seconds: float) -> None:
        select.select([self._wake_r], [], [], seconds)

    def _shutdown(self) -> None:
        for sock in self._watch.values():
            sock.close()
        self._watch.clear()
        if self.detach_on_exit:
            for name in self.managed():
                with contextlib.suppress(TcbError):
                    attachments.detach(name)
                    log.info("detached %s on exit", name)
        if self._wakeup_fd_set:
            signal.set_wakeup_fd(-1)  # before the fd number can be reused
        os.close(self._wake_r)
        os.close(self._wake_w)

    def node_ports(self) -> list[nodeview.PortRow]:
        """The node-wide view of VM ports, from the rows the OVSDB monitor holds (for the metrics)."""
        return nodeview.node_ports(self.settings, ports=list(self._ports.values()))

    def managed(self) -> list[str]:
        """Names of the attachments this agent (any agent) manages."""
        out = []
        for name in health.names():
            record = attachments.read_record(attachments.pin_dir_of(name))
            if record is not None and record.managed_by == "agent":
                out.append(name)
        return out

    # --- the event loop ------------------------------------------------------------
    def _serve(self, conn: ovsdb.Connection) -> None:
        conn_id = "tcbypass-agent"
        reply = conn.call("monitor", [ovsdb.DATABASE, conn_id, {"Interface": {"columns": ovsdb.INTERFACE_COLUMNS}}])
        if reply.get("error"):
            raise OvsdbError(f"OVSDB refused the monitor ({reply['error']})")
        # A (re)connect brings the whole current state: forget rows we can no longer see.
        seen = dict(ovsdb.table_updates(reply.get("result") or {}))
        for uuid in list(self._ports):
            if uuid not in seen:
                self._row_changed(uuid, None)
        for uuid, port in seen.items():
            self._row_changed(uuid, port)
        # Attachments the agent made for VMIs that no longer have rows (pod deleted while we were away).
        self._collect_orphans()

        while not self._stop:
            self._turn(conn, None)

    def _turn(self, conn: ovsdb.Connection | None, limit: float | None) -> None:
        """Reconcile what is due, then wait (at most `limit` seconds) for the next
        OVSDB update (when connected), link event, retry or stop, and take it."""
        self._reconcile_due()
        timeout = self._next_deadline()
        if limit is not None:
            timeout = limit if timeout is None else min(timeout, limit)
        readers = [self._wake_r, *self._watch.values(), *([conn.fileno()] if conn is not None else [])]
        for ready in _wait_readable(readers, timeout):
            if conn is not None and ready == conn.fileno():
                self._drain_ovsdb(conn)
            elif ready == self._wake_r:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            else:
                self._link_event(ready)

    def _drain_ovsdb(self, conn: ovsdb.Connection) -> None:
        msg = conn.receive(timeout=self.settings.ovsdb_timeout)
        while True:
            if msg.get("method") == "echo":
                conn.send_reply(msg.get("id"), msg.get("params", []))
            elif msg.get("method") == "update" and len(msg.get("params", [])) == 2:
                for uuid, port in ovsdb.table_updates(msg["params"][1]):
                    self._row_changed(uuid, port)
            if not conn.pending():
                break
            msg = conn.receive(timeout=self.settings.ovsdb_timeout)

    def _row_changed(self, uuid: str, port: ovsdb.Port | None) -> None:
        old = self._ports.pop(uuid, None)
        if port is not None and port.pod_name and port.pod_namespace:
            self._ports[uuid] = port
            self._mark((port.pod_namespace, port.pod_name))
            self._watch_netns(port.pod_netns)
        if old is not None and (port is None or (old.pod_namespace, old.pod_name) != (port.pod_namespace,
                                                                                      port.pod_name)):
            self._mark((old.pod_namespace, old.pod_name))
        self._unwatch_unused()

    def _watch_netns(self, path: str) -> None:
        if not path or path in self._watch:
            return
        try:
            self._watch[path] = _link_events_socket(path)
        except (NetnsError, OSError) as exc:
            log.debug("cannot watch %s: %s", path, exc)

    def _unwatch_unused(self) -> None:
        wanted = {p.pod_netns for p in self._ports.values()}
        for path in [p for p in self._watch if p not in wanted]:
            # An open socket would keep a deleted pod's namespace alive.
            self._watch.pop(path).close()

    def _link_event(self, sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass
        path = next((p for p, s in self._watch.items() if s is sock), None)
        for port in self._ports.values():
            if port.pod_netns == path:
                self._mark((port.pod_namespace, port.pod_name))

    def _mark(self, key: tuple[str, str]) -> None:
        self._dirty.setdefault(key, time.monotonic())
        self._retry_at.pop(key, None)

    def _next_deadline(self) -> float | None:
        now = time.monotonic()
        times = [t + self.debounce for t in self._dirty.values()] + list(self._retry_at.values())
        return max(0.0, min(times) - now) if times else None

    def _reconcile_due(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._retry_at.items() if t <= now]:
            self._retry_at.pop(key)
            self._dirty.setdefault(key, now - self.debounce)
        for key, since in list(self._dirty.items()):
            if since + self.debounce <= now:
                self._dirty.pop(key)
                self._reconcile(key)

    # --- reconciling one VMI ----------------------------------------------------------
    def _reconcile(self, key: tuple[str, str]) -> None:
        self.stats.reconciles += 1
        try:
            self._reconcile_vmi(key)
        except Exception as exc:  # never ends the loop: the other pods are still served
            self._unexpected(f"{key[0]}/{key[1]}", exc)
            self._retry_later(key)

    def _reconcile_vmi(self, key: tuple[str, str]) -> None:
        namespace, name = key
        if not self._rows_of(key):
            try:
                self._detach(key, "pod gone")
            except TcbError as exc:
                self.stats.failures += 1
                log.warning("%s/%s: detach failed (%s); retrying", namespace, name, exc)
                self._retry_later(key)
            return
        try:
            result = attach_vmi(name, namespace, self.settings, managed_by="agent", ports=self._rows_of(key))
        except (NotBypassableError, UnknownVmiError) as exc:
            # An ordinary pod, or a VM not plugged yet: wait for its devices to change.
            log.debug("%s/%s: not bypassed: %s", namespace, name, exc)
            self._detach(key, "no longer bypassable")
            return
        except TcbError as exc:
            if self._pod_gone(key):
                # Deleted while we attached: the attach undid itself; the row's removal will come.
                self.stats.gone += 1
                log.debug("%s/%s: the pod went while it was being attached (%s)", namespace, name, exc)
                return
            if isinstance(exc, NetnsError):
                log.debug("%s/%s: %s", namespace, name, exc)
                return
            self.stats.failures += 1
            delay = self._retry_later(key)
            log.warning("%s/%s: attach failed (%s); the bridge still carries it; retrying in %.1f s",
                        namespace, name, exc, delay)
            return
        self._backoff.pop(key, None)
        for done in result.attached:
            if done.action != "unchanged":
                self.stats.attaches += 1
                log.info("%s/%s: %s %s (%s <-> %s)", namespace, name, done.action, done.record.name,
                         done.record.tap, done.record.nic)
        for record in result.removed:
            self.stats.detaches += 1
            log.info("%s/%s: %s is no longer bypassable, detached", namespace, name, record.name)
        for plan in result.skipped:
            log.debug("%s/%s %s: %s", namespace, name, plan.label, plan.recognition.line())

    def _rows_of(self, key: tuple[str, str]) -> list[ovsdb.Port]:
        return [p for p in self._ports.values() if (p.pod_namespace, p.pod_name) == key]

    def _pod_gone(self, key: tuple[str, str]) -> bool:
        """Did the VMI's pod go away: every namespace its rows name, or its rows
        themselves? The monitor's news of a deletion may still be on its way,
        so OVSDB is asked afresh (only ever after a failed attach)."""
        rows = self._rows_of(key)
        if not rows or all(netns.identity_of(p.pod_netns) is None for p in rows):
            return True
        with contextlib.suppress(OvsdbError):
            return not ovsdb.kubeovn_ports(self.settings.url, self.settings.ovsdb_timeout,
                                           pod_namespace=key[0], pod_name=key[1])
        return False

    def _detach(self, key: tuple[str, str], why: str) -> None:
        namespace, name = key
        for record in detach_vmi(name, namespace):
            self.stats.detaches += 1
            log.info("%s/%s: %s, detached %s", namespace, name, why, record.name)
        self._backoff.pop(key, None)

    def _retry_later(self, key: tuple[str, str]) -> float:
        delay = min(self._backoff.get(key, RETRY[0] / 2) * 2, RETRY[1])
        self._backoff[key] = delay
        self._retry_at[key] = time.monotonic() + delay
        return delay

    def _unexpected(self, what: str, exc: Exception) -> None:
        """Count a bug and log it: with its traceback the first time this kind
        of exception comes from this place, in one line after that."""
        self.stats.unexpected += 1
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        signature = (type(exc).__name__, where)
        if signature in self._tracebacks_logged:
            log.error("%s: unexpected %s at %s again: %s (traceback logged before); going on",
                      what, type(exc).__name__, where, exc)
            return
        self._tracebacks_logged.add(signature)
        log.error("%s: unexpected %s: %s; going on with the other pods (please report this)\n%s", what,
                  type(exc).__name__, exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def _collect_orphans(self) -> None:
        live = {(p.pod_namespace, p.pod_name) for p in self._ports.values()}
        for name in self.managed():
            record = attachments.read_record(attachments.pin_dir_of(name))
            if record is not None and (record.namespace, record.vmi) not in live:
                self._mark((record.namespace, record.vmi))

