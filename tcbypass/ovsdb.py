"""A small OVSDB client (RFC 7047 JSON-RPC over a unix or tcp socket).

tcbypass only reads: Kube-OVN's port rows in the Interface table. One
`transact` with a `select` (explicit columns, a where clause, a timeout) per
question, or a `monitor` for the agent. OVSDB's typed values (`map`, `set`,
`uuid`) are decoded in one place, `decode_value`.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator

from .errors import OvsdbError

DEFAULT_URL = "unix:/run/openvswitch/db.sock"
ENV_URL = "TCBYPASS_OVSDB"
DATABASE = "Open_vSwitch"
TIMEOUT = 5.0
INTERFACE_COLUMNS = ["name", "external_ids", "ifindex", "ofport", "type"]
HINT = f"start Open vSwitch, or point tcbypass at the right socket with --ovsdb URL or ${ENV_URL}"


def default_url() -> str:
    return os.environ.get(ENV_URL) or DEFAULT_URL


# --- decoding (pure) -------------------------------------------------------

def decode_value(value):
    """OVSDB wire value -> Python: ["map", [[k, v]...]] -> dict, ["set", [...]] -> list,
    ["uuid", s] -> s, atoms as they are."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        kind, body = value
        if kind == "map":
            return {decode_value(k): decode_value(v) for k, v in body}
        if kind == "set":
            return [decode_value(v) for v in body]
        if kind in ("uuid", "named-uuid"):
            return body
    return value


def _optional_int(value) -> int | None:
    """An optional integer column: a bare int, or an empty set when unset ("not ready yet")."""
    value = decode_value(value)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and value >= 0 else None


@dataclass(frozen=True)
class Port:
    """One Interface row written by Kube-OVN for a pod NIC."""

    name: str  # host side of the veth: <containerID[:12]>_h
    iface_id: str
    pod_name: str  # the VM name for VM pods
    pod_namespace: str
    pod_netns: str
    ip: str
    ifindex: int | None  # None until OVS has resolved the device
    ofport: int | None
    external_ids: dict = field(default_factory=dict, compare=False, hash=False)
    type: str = ""  # the Interface's OVS type: "" (a kernel device), dpdkvhostuserclient, ...


def decode_port(row: dict) -> Port | None:
    """A Kube-OVN port from a select/monitor row, or None for any other interface."""
    ids = decode_value(row.get("external_ids", ["map", []]))
    if not isinstance(ids, dict) or ids.get("vendor") != "kube-ovn":
        return None
    return Port(
        name=row.get("name", ""),
        iface_id=ids.get("iface-id", ""),
        pod_name=ids.get("pod_name", ""),
        pod_namespace=ids.get("pod_namespace", ""),
        pod_netns=ids.get("pod_netns", ""),
        ip=ids.get("ip", ""),
        ifindex=_optional_int(row.get("ifindex", ["set", []])),
        ofport=_optional_int(row.get("ofport", ["set", []])),
        external_ids=ids,
        type=row.get("type", "") if isinstance(row.get("type", ""), str) else "",
    )


def decode_select_reply(reply: dict) -> list[dict]:
    """Rows of a one-operation transact reply, or OvsdbError for anything else."""
    if not isinstance(reply, dict):
        raise OvsdbError("OVSDB answered with something that is not JSON-RPC", hint=HINT)
    if reply.get("error"):
        raise OvsdbError(f"OVSDB refused the query ({reply['error']})", hint=HINT)
    result = reply.get("result")
    if not isinstance(result, list) or not result or not isinstance(result[0], dict):
        raise OvsdbError("OVSDB answered with an unexpected reply shape", hint=HINT)
    if result[0].get("error"):
        raise OvsdbError(f"OVSDB refused the select ({result[0]['error']}: {result[0].get('details', '')})",
                         hint=HINT)
    rows = result[0].get("rows")
    if not isinstance(rows, list):
        raise OvsdbError("OVSDB reply has no rows", hint=HINT)
    return rows


def kubeovn_where(**ids: str) -> list:
    """A where clause matching Interface rows whose external_ids include `ids`."""
    pairs = [["vendor", "kube-ovn"]] + [[k, v] for k, v in sorted(ids.items())]
    return [["external_ids", "includes", ["map", pairs]]]


# --- the connection ----------------------------------------------------------

class Connection:
    """One JSON-RPC session. Use as a context manager."""

    def __init__(self, url: str | None = None, timeout: float = TIMEOUT):
        self.url = url or default_url()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)
        self._decoder = json.JSONDecoder()

    def __enter__(self) -> "Connection":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        kind, _, where = self.url.partition(":")
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address = where
            elif kind == "tcp":
                host, _, port = where.rpartition(":")
                sock = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET)
                address = (host.strip("[]"), int(port))
            else:
                raise OvsdbError(f"unsupported OVSDB address {self.url!r}",
                                 hint="use unix:/path/to/db.sock or tcp:HOST:PORT")
        except ValueError:
            raise OvsdbError(f"malformed OVSDB address {self.url!r}", hint="use unix:/path or tcp:HOST:PORT") from None
        sock.settimeout(self.timeout)
        try:
            sock.connect(address)
        except FileNotFoundError:
            sock.close()
            raise OvsdbError(f"no OVSDB socket at {self.url} (file not found)", hint=HINT) from None
        except ConnectionRefusedError:
            sock.close()
            raise OvsdbError(f"OVSDB at {self.url} refused the connection (is ovsdb-server running?)",
                             hint=HINT) from None
        except socket.timeout:
            sock.close()
            raise OvsdbError(f"OVSDB at {self.url} did not accept within {self.timeout:g} s", hint=HINT) from None
        except OSError as exc:
            sock.close()
            raise OvsdbError(f"cannot connect to OVSDB at {self.url} ({exc.strerror})", hint=HINT) from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def pending(self) -> bool:
        """Is a further message already buffered (so select() would not wake for it)?"""
        return bool(self._buf.strip())

    def send(self, method: str, params: list, id_=None) -> object:
        msg_id = next(self._ids) if id_ is None else id_
        data = json.dumps({"method": method, "params": params, "id": msg_id}).encode()
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise OvsdbError(f"lost the OVSDB connection at {self.url} ({exc.strerror})", hint=HINT) from None
        return msg_id

    def receive(self, timeout: float | None = None) -> dict:
        """The next complete JSON message from the server."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    msg, end = self._decoder.raw_decode(text.decode("utf-8", errors="strict"))
                except UnicodeDecodeError:
                    raise OvsdbError(f"OVSDB at {self.url} sent bytes that are not UTF-8", hint=HINT) from None
                except json.JSONDecodeError:
                    if len(text) > 64 << 20 or not text.startswith((b"{", b"[")):
                        raise OvsdbError(f"OVSDB at {self.url} answered garbage, not JSON-RPC", hint=HINT) from None
                    msg = None
                if msg is not None:
                    self._buf = text.decode()[end:].encode()
                    if not isinstance(msg, dict):
                        raise OvsdbError(f"OVSDB at {self.url} answered garbage, not JSON-RPC", hint=HINT)
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OvsdbError(f"OVSDB at {self.url} did not answer within {self.timeout:g} s", hint=HINT)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise OvsdbError(f"OVSDB at {self.url} did not answer within {self.timeout:g} s", hint=HINT) from None
            except OSError as exc:
                raise OvsdbError(f"lost the OVSDB connection at {self.url} ({exc.strerror})", hint=HINT) from None
            if not chunk:
                raise OvsdbError(f"OVSDB at {self.url} closed the connection", hint=HINT)
            self._buf += chunk

    def call(self, method: str, params: list) -> dict:
        """Send a request and return its reply, answering the server's echo requests meanwhile."""
        msg_id = self.send(method, params)
        while True:
            msg = self.receive()
            if msg.get("method") == "echo":
                self.send_reply(msg.get("id"), msg.get("params", []))
                continue
            if msg.get("id") == msg_id:
                return msg

    def send_reply(self, msg_id, result) -> None:
        data = json.dumps({"id": msg_id, "result": result, "error": None}).encode()
        self._sock.sendall(data)

    def select(self, table: str, columns: list[str], where: list) -> list[dict]:
        reply = self.call("transact", [DATABASE, {"op": "select", "table": table, "where": where,
                                                  "columns": columns}])
        try:
            return decode_select_reply(reply)
        except OvsdbError as exc:
            raise OvsdbError(f"{exc.message} (OVSDB at {self.url})", hint=exc.hint) from None


def kubeovn_ports(url: str | None = None, timeout: float = TIMEOUT, **ids: str) -> list[Port]:
    """All Kube-OVN pod ports on this node whose external_ids include `ids`."""
    with Connection(url, timeout) as conn:
        rows = conn.select("Interface", INTERFACE_COLUMNS, kubeovn_where(**ids))
    return [p for p in map(decode_port, rows) if p is not None]


def table_updates(table_updates: dict) -> Iterator[tuple[str, Port | None]]:
    # A monitor's "new" carries every monitored column; "old" only the changed ones.
    for uuid, change in (table_updates.get("Interface") or {}).items():
        yield uuid, decode_port(change["new"]) if "new" in change else None

