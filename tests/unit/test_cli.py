"""The CLI through click's CliRunner against a fake backend: no root, no kernel."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from tcbypass import bindings
from tcbypass.bindings import Recognition
from tcbypass.cli import App, main
from tcbypass.discovery import NicPlan
from tcbypass.errors import NotBypassableError, NotRootError, OvsdbError, UnknownVmiError
from tcbypass.maps import Counters
from tcbypass.model import AttachResult, Record, Status
from tcbypass.nodeview import PortRow
from tcbypass.ovsdb import Port
from tcbypass.vmi import VmiResult

SRIOV = Recognition(bindings.SRIOV, bindings.BY_DESIGN, "OVS port x_h is a VF representor, not a veth")
MASQ = Recognition(bindings.MASQUERADE, bindings.BY_DESIGN, "tap0 sits on k6t-eth0, which routes 10.0.2.1/24")


def record(name="vm1.prod", **changes) -> Record:
    base = dict(name=name, netns="/var/run/netns/p", netns_id="4:100", tap="tap0", tap_ifindex=5, nic="eth0-nic",
                nic_ifindex=3, bridge="k6t-eth0", bridge_mac="0a:bb:00:00:00:03", mac="0a:00:00:00:00:05",
                dhcp_to_bridge=True, digest="abc", vmi="vm1", namespace="prod", iface_id=name, complete=True,
                hook="tcx", from_vm="peer", host_mac="0a:cc:00:00:00:01")
    return Record(**(base | changes))


class FakeBackend:
    def __init__(self, fail=None, root=True, rows=(), port_rows=(), attached=True):
        self.calls, self.fail, self.root, self.rows = [], fail, root, list(rows)
        self.port_rows, self.attached = list(port_rows), attached

    def _maybe_fail(self):
        if self.fail:
            raise self.fail

    def require_root(self, what):
        if not self.root:
            raise NotRootError(f"tcbypass {what} needs root", hint="run with sudo")

    def attach_explicit(self, spec):
        self.calls.append(("attach_explicit", spec))
        self._maybe_fail()
        return AttachResult(record(spec.name, vmi="", namespace="", iface_id=""), "attached", 0.25)

    def attach_vmi(self, name, namespace, settings, dhcp_to_bridge, hook="", from_vm=""):
        self.calls.append(("attach_vmi", name, namespace, settings, dhcp_to_bridge))
        self.options = (hook, from_vm)
        self._maybe_fail()
        skipped = NicPlan(Port("x_h", "vm1.prod.sriov", "vm1", "prod", "/p", "", 1, 1), None, SRIOV)
        if not self.attached:
            masq = NicPlan(Port("y_h", "vm1.prod", "vm1", "prod", "/p", "", 2, 2), None, MASQ)
            return VmiResult(name, namespace, (), (masq,), ())
        return VmiResult(name, namespace, (AttachResult(record(), "unchanged", 0.002),), (skipped,), ())

    def detach(self, target, namespace, remove_qdisc=False):
        self.calls.append(("detach", target, namespace, remove_qdisc))
        self._maybe_fail()
        return [record()] if target == "vm1" else []

    def statuses(self, namespace, name):
        self.calls.append(("statuses", namespace, name))
        return self.rows

    def node_ports(self, namespace, settings):
        self.calls.append(("node_ports", namespace, settings))
        return self.port_rows

    def agent(self, settings, detach_on_exit, metrics_address, ports_refresh):
        self.calls.append(("agent", settings, detach_on_exit, metrics_address, ports_refresh))
        if metrics_address.endswith(":99999"):
            raise OSError(22, "port out of range")

    def doctor(self):
        from tcbypass.doctor import Check, Report

        self.calls.append(("doctor",))
        checks = (Check("bpffs", True, "mounted on /sys/fs/bpf"),
                  Check("locked memory", self.root, "limit 64 KiB", "raise it", required=True))
        return Report(checks, None, "tcx" if self.root else "", "peer" if self.root else "")

    def prepare(self, cache_dir):
        from tcbypass.build import Build

        self.calls.append(("prepare", cache_dir))
        return [(Build(), f"{cache_dir}/redirect-1.json"), (Build(no_peer=True), f"{cache_dir}/redirect-2.json")]


def invoke(backend, *args, env=None):
    app = App(backend, Console(width=250), Console(stderr=True, width=1000))
    return CliRunner().invoke(main, list(args), obj=app, env=env or {})


def test_attach_vmi_reports_each_nic_and_the_ones_skipped():
    fake = FakeBackend()
    res = invoke(fake, "attach", "vm1", "-n", "prod", "--ovsdb", "unix:/x.sock")
    assert res.exit_code == 0, res.output
    assert "prod/vm1 vm1.prod: unchanged (tap0 <-> eth0-nic, 0a:00:00:00:00:05; tcx, from the VM by peer)" in res.output
    assert ("prod/vm1 vm1.prod.sriov: sriov binding, not bypassable: OVS port x_h is a VF representor, "
            "not a veth; nothing to do") in res.output
    _, name, ns, settings, dhcp = fake.calls[0]
    assert (name, ns, settings.url, dhcp) == ("vm1", "prod", "unix:/x.sock", True)


def test_namespace_defaults_to_default_and_ovsdb_comes_from_the_environment():
    fake = FakeBackend()
    assert invoke(fake, "attach", "vm1", env={"TCBYPASS_OVSDB": "unix:/env.sock"}).exit_code == 0
    assert fake.calls[0][2] == "default" and fake.calls[0][3].url == "unix:/env.sock"


def test_explicit_attach_passes_the_spec():
    fake = FakeBackend()
    res = invoke(fake, "attach", "--netns", "/proc/42/ns/net", "--tap", "tap0", "--nic", "eth0-nic",
                 "--mac", "0a:00:00:00:00:05", "--no-dhcp-passthrough")
    assert res.exit_code == 0, res.output
    spec = fake.calls[0][1]
    assert (spec.name, spec.netns, spec.dhcp_to_bridge) == ("42-tap0", "/proc/42/ns/net", False)


def test_attach_leaves_hook_and_mode_to_the_kernel_unless_asked():
    fake = FakeBackend()
    assert invoke(fake, "attach", "vm1").exit_code == 0
    assert fake.options == ("", "")
    assert invoke(fake, "attach", "vm1", "--hook", "clsact", "--from-vm", "redirect").exit_code == 0
    assert fake.options == ("clsact", "redirect")
    res = invoke(fake, "attach", "--netns", "/proc/42/ns/net", "--tap", "tap0", "--nic", "eth0-nic",
                 "--mac", "0a:00:00:00:00:05", "--hook", "tcx", env={"TCBYPASS_HOOK": "clsact"})
    assert res.exit_code == 0, res.output
    assert (fake.calls[-1][1].hook, fake.calls[-1][1].from_vm) == ("tcx", "")


def test_attach_refuses_an_unknown_hook_as_usage():
    fake = FakeBackend()
    res = invoke(fake, "attach", "vm1", "--hook", "xdp")
    assert res.exit_code == 2 and "xdp" in res.output and fake.calls == []


@pytest.mark.parametrize("args, message", [
    ((), "give a VMI name"),
    (("vm1", "--tap", "tap0"), "not both"),
    (("--netns", "x", "--tap", "tap0"), "also needs --nic, --mac"),
])
def test_usage_errors_exit_2(args, message):
    fake = FakeBackend()
    res = invoke(fake, "attach", *args)
    assert res.exit_code == 2 and message in res.output
    assert fake.calls == []


@pytest.mark.parametrize("error, code", [
    (UnknownVmiError("no VMI 'x' in namespace 'prod' on this node", hint="pods and VMIs here: a, b"), 1),
    (OvsdbError("no OVSDB socket at unix:/x (file not found)", hint="use --ovsdb"), 1),
])
def test_core_errors_are_one_line_on_stderr(error, code):
    res = invoke(FakeBackend(fail=error), "attach", "x", "-n", "prod")
    assert res.exit_code == code
    assert res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: ") and error.hint in res.stderr
    assert "Traceback" not in res.output


def test_not_root_is_refused_before_any_work():
    fake = FakeBackend(root=False)
    res = invoke(fake, "attach", "vm1")
    assert res.exit_code == 1 and "needs root" in res.stderr and fake.calls == []


def test_detach_nothing_attached_is_success():
    res = invoke(FakeBackend(), "detach", "ghost")
    assert res.exit_code == 0 and "not attached, nothing to do" in res.output


def test_detach_vmi_lists_what_went_back_to_the_bridge():
    res = invoke(FakeBackend(), "detach", "vm1", "-n", "prod")
    assert res.exit_code == 0 and "vm1.prod: detached, tap0 and eth0-nic use the bridge again" in res.output


def test_status_json_has_the_stable_keys():
    counters = Counters({"from_vm": 3, "to_vm": 4}, {"from_vm": 300, "to_vm": 400},
                        {"multicast": 1, "dhcp": 2})
    fake = FakeBackend(rows=[Status(record(), "active", (), counters)])
    res = invoke(fake, "status", "--json")
    assert res.exit_code == 0
    [row] = json.loads(res.output)
    for key in ("vmi", "namespace", "iface_id", "netns", "tap", "nic", "mac", "state", "counters"):
        assert key in row
    assert row["counters"]["redirected_packets"] == {"from_vm": 3, "to_vm": 4}
    assert row["counters"]["passed_packets"]["dhcp"] == 2
    assert fake.calls == [("statuses", None, None)]


def test_status_with_a_vmi_defaults_to_namespace_default():
    fake = FakeBackend()
    invoke(fake, "status", "vm1")
    assert fake.calls == [("statuses", "default", "vm1")]


def test_status_table_and_degraded_exit_code():
    rows = [Status(record(), "active"), Status(record("vm1.prod.b"), "stale", ("tap tap0 is gone",))]
    res = invoke(FakeBackend(rows=rows), "status")
    assert res.exit_code == 3
    assert "stale" in res.output and "tap tap0 is gone" in res.output and "vm1.prod.b" in res.output


def test_empty_status_says_how_to_attach():
    res = invoke(FakeBackend(), "status")
    assert res.exit_code == 0 and "tcbypass attach VMI" in res.output


def test_help_teaches_the_commands():
    res = CliRunner().invoke(main, ["--help"])
    for command in ("attach", "detach", "status", "doctor", "agent", "gc", "prepare"):
        assert command in res.output
    assert "demo" not in res.output and "bench" not in res.output, "the lab has its own door: tcbypass-lab"
    res = CliRunner().invoke(main, ["attach", "--help"])
    assert "Examples" in res.output and "--ovsdb" in res.output


def test_attach_with_only_healthy_unbypassable_bindings_is_success_with_one_line_per_nic():
    res = invoke(FakeBackend(attached=False), "attach", "vm1", "-n", "prod")
    assert res.exit_code == 0, res.output
    assert res.output == ("prod/vm1 vm1.prod: masquerade binding, not bypassable: tap0 sits on k6t-eth0, which "
                          "routes 10.0.2.1/24; nothing to do\n")


def test_attach_on_a_pod_still_being_plugged_is_a_one_line_failure():
    error = NotBypassableError("VMI prod/vm1 has no bypassable NIC (vm1.prod: no binding yet, ...)",
                               hint="attach again once virt-handler has plugged the pod")
    res = invoke(FakeBackend(fail=error), "attach", "vm1", "-n", "prod")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "plugged the pod" in res.stderr


def port_row(vmi, binding, state, reason="why", nic=None):
    return PortRow(vmi=vmi, namespace="prod", nic=nic or f"{vmi}.prod", binding=binding, state=state, reason=reason,
                   port=f"{vmi}_h", netns=f"/var/run/netns/{vmi}")


ALL = [port_row("a", "bridge", "active", "fast path live (tap0 <-> eth0-nic)"),
       port_row("b", "masquerade", "not bypassable", "tap0 sits on k6t-eth0 [NAT]"),
       port_row("c", "kube-ovn-direct", "not bypassable", "already direct: the VM's tap c_h is itself the OVS port")]


def test_status_all_json_has_the_same_rows_and_keys():
    fake = FakeBackend(port_rows=ALL)
    res = invoke(fake, "status", "--all", "--json", "-n", "prod", "--ovsdb", "unix:/x.sock")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [r["vmi"] for r in out] == ["a", "b", "c"]
    assert set(out[0]) == {"vmi", "namespace", "nic", "binding", "state", "reason", "port", "netns", "attachment"}
    assert out[2]["reason"].startswith("already direct")
    _, namespace, settings = fake.calls[0]
    assert namespace == "prod" and settings.url == "unix:/x.sock"


def test_status_all_table_shows_binding_state_and_reason():
    res = invoke(FakeBackend(port_rows=ALL), "status", "--all")
    assert res.exit_code == 0
    for text in ("VM ports on this node", "prod/b", "masquerade", "not bypassable", "[NAT]", "kube-ovn-direct",
                 "already direct"):
        assert text in res.output, text


@pytest.mark.parametrize("state", ["stale", "orphaned", "not attached"])
def test_status_all_is_degraded_when_a_port_could_be_fast_and_is_not(state):
    res = invoke(FakeBackend(port_rows=ALL + [port_row("d", "bridge", state)]), "status", "--all")
    assert res.exit_code == 3


@pytest.mark.parametrize("width", [80, 200])
def test_status_all_table_keeps_the_reason_readable_on_narrow_terminals(width):
    app = App(FakeBackend(port_rows=ALL), Console(width=width), Console(stderr=True, width=1000))
    res = CliRunner().invoke(main, ["status", "--all"], obj=app)
    words = set(res.output.replace("│", " ").split())
    for row in ALL:  # wrapped, never cropped
        assert set(row.reason.split()) <= words, row.reason


def test_status_all_refuses_a_vmi_argument():
    fake = FakeBackend()
    res = invoke(fake, "status", "--all", "vm1")
    assert res.exit_code == 2 and "filter with -n" in res.output and fake.calls == []


def test_status_all_with_no_vm_ports():
    res = invoke(FakeBackend(), "status", "--all")
    assert res.exit_code == 0 and "No Kube-OVN VM ports on this node." in res.output


def test_plain_status_does_not_read_the_node_ports():
    fake = FakeBackend()
    invoke(fake, "status")
    assert [c[0] for c in fake.calls] == ["statuses"]


def test_agent_takes_its_settings_and_says_in_one_line_when_metrics_cannot_be_served():
    backend = FakeBackend()
    res = invoke(backend, "agent", "--ovsdb", "unix:/x.sock", "--metrics-address", "127.0.0.1:9999",
                 "--detach-on-exit")
    assert res.exit_code == 0
    [(_, settings, detach, address, refresh)] = backend.calls
    assert (settings.ovsdb_url, detach, address, refresh) == ("unix:/x.sock", True, "127.0.0.1:9999", 15.0)
    res = invoke(FakeBackend(), "agent", "--metrics-address", "127.0.0.1:99999")
    assert res.exit_code == 1 and "cannot serve metrics on 127.0.0.1:99999" in res.output
    assert "Traceback" not in res.output


def test_doctor_prints_each_check_and_the_fix_of_a_failed_one():
    res = invoke(FakeBackend(), "doctor")
    assert res.exit_code == 0 and "ok   bpffs" in res.output and "path: tcx" in res.output
    res = invoke(FakeBackend(root=False), "doctor", "--json")
    assert res.exit_code == 1
    res = invoke(FakeBackend(root=False), "doctor")
    assert res.exit_code == 1 and "FAIL locked memory" in res.output and "fix: raise it" in res.output


def test_prepare_names_each_build_it_left_in_the_cache():
    backend = FakeBackend()
    res = invoke(backend, "prepare", "--cache-dir", "/img/objects")
    assert res.exit_code == 0 and backend.calls == [("prepare", "/img/objects")]
    assert res.output.splitlines() == ["/img/objects/redirect-1.json: default",
                                       "/img/objects/redirect-2.json: without bpf_redirect_peer (kernels before 5.10)"]


NARROW_ROWS = [Status(record("vm-web-frontend-01.production", vmi="vm-web-frontend-01", namespace="production",
                             netns="/var/run/netns/cni-7d3f2a9e-1b4c-4e8f-9a6d-2c5b8e1f4a7d"), "active",
                      counters=Counters.zero()),
               Status(record("vm-db-02.production.storage-net.production.ovn", vmi="vm-db-02",
                             namespace="production"), "stale", ("tap tap0 is gone", "our tcx link on tap0 is missing")),
               Status(record("vm3.prod"), "orphaned", ("the pod's network namespace is gone",))]


def render(width: int, *args: str) -> list[str]:
    app = App(FakeBackend(rows=NARROW_ROWS), Console(width=width), Console(stderr=True, width=1000))
    res = CliRunner().invoke(main, ["status", *args], obj=app)
    return res.output.splitlines()


@pytest.mark.parametrize("width", [80, 120])
def test_status_fits_a_narrow_terminal_one_line_per_attachment(width):
    lines = render(width)
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= width
    body = [line for line in table if line.startswith("│")]
    assert len(body) == len(NARROW_ROWS), "one line per attachment, nothing wrapped"
    for line, s in zip(body, NARROW_ROWS):
        assert s.state in line and line.rstrip().endswith("0 │"), line
    assert "tcbypass status -o wide" in "\n".join(lines)
    for problem in ("tap tap0 is gone", "our tcx link on tap0 is missing", "the pod's network namespace is gone"):
        assert any(problem in line and not line.startswith("│") for line in lines), problem


def test_status_wide_shows_every_column_and_the_problems_in_the_table():
    lines = render(250, "-o", "wide")
    text = "\n".join(lines)
    for column in ("netns", "MAC", "pod NIC", "passed to the bridge", "path", "pkts / bytes"):
        assert column in text
    assert "cni-7d3f2a9e" in text and "-o wide" not in text
    assert any("tap tap0 is gone" in line and line.startswith("│") for line in lines)
