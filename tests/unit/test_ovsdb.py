"""OVSDB decoding against replies recorded from a real ovsdb-server (tests/unit/data)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from tcbypass import ovsdb
from tcbypass.errors import OvsdbError

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_decode_value_handles_map_set_uuid_and_atoms():
    assert ovsdb.decode_value(["map", [["a", "1"], ["b", ["uuid", "x-y"]]]]) == {"a": "1", "b": "x-y"}
    assert ovsdb.decode_value(["set", []]) == []
    assert ovsdb.decode_value(["set", [1, 2]]) == [1, 2]
    assert ovsdb.decode_value(7) == 7
    assert ovsdb.decode_value("internal") == "internal"


def test_select_reply_gives_only_kube_ovn_ports():
    rows = ovsdb.decode_select_reply(recorded("select_interfaces.json"))
    ports = [p for p in map(ovsdb.decode_port, rows) if p is not None]
    assert len(rows) == len(ports) + 1, "the bridge's own internal port is not Kube-OVN's"
    by_iface = {p.iface_id: p for p in ports}
    assert set(by_iface) == {"web.prod", "vm1.prod", "vm1.prod.attachnet.prod.ovn"}
    vm = by_iface["vm1.prod"]
    assert (vm.pod_name, vm.pod_namespace, vm.ip) == ("vm1", "prod", "10.16.0.5")
    assert vm.pod_netns.startswith("/var/run/netns/") and vm.name.endswith("_h")
    assert isinstance(vm.ifindex, int) and isinstance(vm.ofport, int)


def test_unset_ifindex_means_not_ready():
    row = {"name": "abc_h", "ifindex": ["set", []], "ofport": ["set", []],
           "external_ids": ["map", [["vendor", "kube-ovn"], ["pod_name", "vm"]]]}
    port = ovsdb.decode_port(row)
    assert port.ifindex is None and port.ofport is None


def test_error_reply_is_an_ovsdb_error():
    with pytest.raises(OvsdbError, match="No table named NoSuchTable"):
        ovsdb.decode_select_reply(recorded("select_error.json"))


@pytest.mark.parametrize("reply", [[], {"result": None}, {"result": []}, {"result": [{"rows": 3}]},
                                   {"error": "bad", "result": None}])
def test_malformed_replies_are_ovsdb_errors(reply):
    with pytest.raises(OvsdbError):
        ovsdb.decode_select_reply(reply)


def test_monitor_initial_rows_decode_like_select_rows():
    reply = recorded("monitor_initial.json")
    changes = list(ovsdb.table_updates(reply["result"]))
    ports = [p for _, p in changes if p is not None]
    assert {p.iface_id for p in ports} == {"web.prod", "vm1.prod", "vm1.prod.attachnet.prod.ovn"}


def test_where_clause_asks_the_server_for_kube_ovn_rows():
    assert ovsdb.kubeovn_where(pod_namespace="prod") == [
        ["external_ids", "includes", ["map", [["vendor", "kube-ovn"], ["pod_namespace", "prod"]]]]]


def test_url_from_environment_then_default(monkeypatch):
    monkeypatch.delenv(ovsdb.ENV_URL, raising=False)
    assert ovsdb.default_url() == "unix:/run/openvswitch/db.sock"
    monkeypatch.setenv(ovsdb.ENV_URL, "unix:/tmp/x.sock")
    assert ovsdb.default_url() == "unix:/tmp/x.sock"


def fake_server(tmp_path, answer: bytes | None, delay_forever: bool = False):
    """A unix socket that answers one request with `answer` (or never answers)."""
    path = str(tmp_path / "db.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.recv(65536)
        if answer is not None:
            conn.sendall(answer)
        if delay_forever:
            threading.Event().wait(5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"unix:{path}", srv


def test_garbage_answer_is_reported(tmp_path):
    url, srv = fake_server(tmp_path, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with srv, pytest.raises(OvsdbError, match="garbage"):
        ovsdb.kubeovn_ports(url, timeout=2)


def test_slow_server_times_out(tmp_path):
    url, srv = fake_server(tmp_path, None, delay_forever=True)
    with srv, pytest.raises(OvsdbError, match="did not answer within 0.3 s"):
        ovsdb.kubeovn_ports(url, timeout=0.3)


def test_reply_larger_than_one_read_is_read_whole(tmp_path):
    body = json.dumps(recorded("select_interfaces.json") | {"id": 1}).encode()
    url, srv = fake_server(tmp_path, body)
    with srv:
        ports = ovsdb.kubeovn_ports(url, timeout=2)
    assert len(ports) == 3


@pytest.mark.parametrize("url, message", [("http://x", "unsupported"), ("tcp:nohostport", "malformed")])
def test_bad_urls_are_explained(url, message):
    with pytest.raises(OvsdbError, match=message):
        ovsdb.Connection(url).connect()
