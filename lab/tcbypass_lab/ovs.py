"""A private Open vSwitch for one emulated node: its own ovsdb-server and
ovs-vswitchd from a run directory of their own, vswitchd inside the node's
namespace, and br-int on the datapath a run asked for.

Two datapaths, as OVS has them:

    system   the kernel datapath (openvswitch.ko), what every Kube-OVN node
             runs: ports are hooked by an rx_handler, a flow cache in the
             kernel, upcalls to vswitchd for misses, conntrack in the kernel;
    netdev   the userspace datapath: vswitchd reads and writes each port
             with AF_PACKET. The only one where the module cannot load
             (this project's build machines: CONFIG_MODULES is off).

`auto` takes system wherever the module loads and netdev elsewhere; a run
that asks for system and cannot have it fails, saying why. Never a silent
fallback: a test or a figure of one datapath must not pass as the other's.

Restarts are what an upgrade does to a node: vswitchd exits and starts
again (on the kernel datapath the datapath and its ports stay in the
kernel meanwhile; on the userspace one they go with the process), or
ovsdb-server goes away for a while and comes back on the same socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

from tcbypass.errors import TcbError

SYSTEM, NETDEV = "system", "netdev"
DATAPATHS = (SYSTEM, NETDEV)
ENV_DATAPATH = "TCBYPASS_DATAPATH"  # auto | system | netdev: what sandboxes use unless told
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


class DatapathError(TcbError):
    """The datapath asked for cannot be had here."""


def kernel_datapath() -> tuple[bool, str]:
    """Can OVS's kernel datapath run here? (yes/no, and what says so)."""
    if os.path.isdir("/sys/module/openvswitch"):
        return True, "openvswitch.ko is loaded"
    try:
        proc = subprocess.run(["modprobe", "openvswitch"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return False, "there is no modprobe here (a kernel without loadable modules)"
    if proc.returncode == 0 and os.path.isdir("/sys/module/openvswitch"):
        return True, "loaded openvswitch.ko"
    why = (proc.stderr or proc.stdout).strip().splitlines()
    modules = "/proc/modules" if os.path.exists("/proc/modules") else "no /proc/modules: CONFIG_MODULES is off"
    return False, f"modprobe openvswitch failed ({why[-1] if why else proc.returncode}; {modules})"


def choose_datapath(requested: str = "") -> str:
    """system or netdev, from what was asked ("" means $TCBYPASS_DATAPATH, else auto)."""
    asked = requested or os.environ.get(ENV_DATAPATH, "") or "auto"
    if asked not in (*DATAPATHS, "auto"):
        raise DatapathError(f"unknown datapath {asked!r}", hint="use system, netdev or auto")
    if asked == NETDEV:
        return NETDEV
    ok, why = kernel_datapath()
    if ok:
        return SYSTEM
    if asked == SYSTEM:
        raise DatapathError(f"OVS's kernel datapath is not available here: {why}",
                            hint="run where openvswitch.ko loads (the kernel matrix's guests do), "
                                 "or use the userspace datapath (netdev)")
    return NETDEV


def _sh(*args: str, netns: str = "", env: dict | None = None, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess:
    from .sandbox import sh

    return sh(*args, netns=netns or None, env=env, check=check, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_pid(pid: int, grace: float = 1.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class PrivateOvs:
    """ovsdb-server and ovs-vswitchd of one node; `netns` is where vswitchd runs
    (the node's namespace: its ports live there)."""

    run_dir: str
    netns: str
    datapath: str
    bridge: str = "br-int"
    _started: list = field(default_factory=list)  # daemons this object started and has not stopped

    @property
    def url(self) -> str:
        return f"unix:{self.run_dir}/db.sock"

    @property
    def env(self) -> dict:
        return {"OVS_RUNDIR": self.run_dir, "OVS_LOGDIR": self.run_dir, "OVS_DBDIR": self.run_dir}

    def ctl(self, daemon: str) -> str:
        return f"{self.run_dir}/{daemon}.ctl"

    def pid(self, daemon: str) -> int:
        with open(f"{self.run_dir}/{daemon}.pid") as f:
            return int(f.read().strip())

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        _sh("ovsdb-tool", "create", f"{self.run_dir}/conf.db", SCHEMA)
        self.start_ovsdb()
        self.vsctl("--no-wait", "init")
        self.start_vswitchd()
        self.vsctl("add-br", self.bridge, "--", "set", "bridge", self.bridge, f"datapath_type={self.datapath}",
                   "protocols=OpenFlow10,OpenFlow13")

    def start_ovsdb(self) -> None:
        d = self.run_dir
        _sh("ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock", f"--pidfile={d}/ovsdb-server.pid",
            f"--unixctl={self.ctl('ovsdb-server')}", f"--log-file={d}/ovsdb-server.log", "--detach", "--no-chdir",
            env=self.env)
        self._started.append("ovsdb-server")

    def start_vswitchd(self) -> None:
        d = self.run_dir
        _sh("ovs-vswitchd", self.url, f"--pidfile={d}/ovs-vswitchd.pid", f"--unixctl={self.ctl('ovs-vswitchd')}",
            f"--log-file={d}/ovs-vswitchd.log", "--detach", "--no-chdir", "-vconsole:off", netns=self.netns,
            env=self.env)
        self._started.append("ovs-vswitchd")

    def stop_daemon(self, daemon: str, cleanup: bool = False) -> None:
        """Ask `daemon` to exit as `ovs-ctl stop` does (vswitchd with `cleanup`
        also deletes its datapath), then make sure it is gone."""
        if daemon not in self._started:
            return
        pid = self.pid(daemon)
        args = ["exit", "--cleanup"] if cleanup else ["exit"]
        _sh("ovs-appctl", "-t", self.ctl(daemon), "--timeout=5", *args, check=False, timeout=10)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        _stop_pid(pid)
        self._started.remove(daemon)

    def restart_vswitchd(self) -> float:
        """What a package upgrade does: vswitchd exits (its datapath stays in the
        kernel on `system`) and starts again. Seconds until br-int is back."""
        started = time.monotonic()
        self.stop_daemon("ovs-vswitchd")
        self.start_vswitchd()
        self.wait_bridge()
        return time.monotonic() - started

    def restart_ovsdb(self, away: float = 0.0) -> None:
        """ovsdb-server stops, stays away `away` seconds, and starts again on the same socket."""
        self.stop_daemon("ovsdb-server")
        if away:
            time.sleep(away)
        self.start_ovsdb()

    def wait_bridge(self, timeout: float = 30) -> None:
        """Until vswitchd has br-int's datapath up again (its ofport answered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.appctl("ovs-vswitchd", "dpif/show", check=False).returncode == 0 and \
                    self.bridge in self.appctl("ovs-vswitchd", "dpif/show", check=False).stdout:
                return
            time.sleep(0.05)
        raise TcbError(f"ovs-vswitchd did not bring {self.bridge} back within {timeout:.0f} s",
                       hint=f"see {self.run_dir}/ovs-vswitchd.log")

    def close(self) -> None:
        """Stop what runs; the kernel datapath goes with it (exit --cleanup)."""
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            with contextlib.suppress(Exception):
                self.stop_daemon(daemon, cleanup=daemon == "ovs-vswitchd")

    @property
    def ovsdb_running(self) -> bool:
        return "ovsdb-server" in self._started

    # --- the database, also while its server is down ------------------------------------
    def _transact(self, ops: list, read_only: bool = False) -> list:
        """One transaction: through ovsdb-server when it runs, else straight into its
        database file (ovsdb-tool): what a client that never lost its session would
        have written while ours was away."""
        txn = json.dumps(["Open_vSwitch", *ops])
        if self.ovsdb_running:
            out = _sh("ovsdb-client", "transact", self.url, txn).stdout
        else:
            out = _sh("ovsdb-tool", "query" if read_only else "transact", f"{self.run_dir}/conf.db", txn).stdout
        results = json.loads(out)
        errors = [r for r in results if isinstance(r, dict) and r.get("error")]
        if errors:
            raise TcbError(f"OVSDB transaction failed: {errors[0]}")
        return results

    def add_port(self, name: str, external_ids: dict, kind: str = "") -> None:
        """A port of br-int with one interface (as `ovs-vsctl add-port` makes it)."""
        row = {"name": name, "external_ids": ["map", sorted(external_ids.items())]}
        if kind:
            row["type"] = kind
        self._transact([
            {"op": "insert", "table": "Interface", "row": row, "uuid-name": "iface"},
            {"op": "insert", "table": "Port", "row": {"name": name, "interfaces": ["named-uuid", "iface"]},
             "uuid-name": "port"},
            {"op": "mutate", "table": "Bridge", "where": [["name", "==", self.bridge]],
             "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]]}])

    def del_port(self, name: str) -> bool:
        """Take a port out of br-int (its rows go with it); False when there was none."""
        [found] = self._transact([{"op": "select", "table": "Port", "where": [["name", "==", name]],
                                   "columns": ["_uuid"]}], read_only=True)
        if not found["rows"]:
            return False
        uuid = found["rows"][0]["_uuid"]
        self._transact([{"op": "mutate", "table": "Bridge", "where": [["name", "==", self.bridge]],
                         "mutations": [["ports", "delete", ["set", [uuid]]]]}])
        return True

    # --- talking to it ---------------------------------------------------------------
    def vsctl(self, *args: str) -> str:
        return _sh("ovs-vsctl", f"--db={self.url}", "--timeout=10", *args).stdout.strip()

    def ofctl(self, command: str, *args: str, check: bool = True) -> str:
        """`ovs-ofctl -O OpenFlow13 COMMAND br-int ARGS` through vswitchd's management socket."""
        return _sh("ovs-ofctl", "-O", "OpenFlow13", command, f"unix:{self.run_dir}/{self.bridge}.mgmt", *args,
                   check=check).stdout

    def appctl(self, daemon: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh("ovs-appctl", "-t", self.ctl(daemon), *args, check=check)

    def flow_packets(self, match: str) -> int:
        """Packets counted by the OpenFlow rule whose description contains `match`,
        once vswitchd has pushed the datapath's flow statistics to its rules
        (they are pulled a round of its revalidators later)."""
        self.appctl("ovs-vswitchd", "revalidator/wait")
        for line in self.ofctl("dump-flows").splitlines():
            if match in line:
                return int(re.search(r"n_packets=(\d+)", line).group(1))
        raise TcbError(f"no OpenFlow rule matching {match!r} on {self.bridge}")

    def ofport(self, port: str) -> int:
        return int(self.vsctl("get", "interface", port, "ofport"))

    def dp_flows(self) -> str:
        """The datapath's flow cache (kernel or userspace), as vswitchd dumps it."""
        return self.appctl("ovs-vswitchd", "dpctl/dump-flows").stdout

    def dp_port_rx(self, port: str) -> int:
        """Packets the datapath received on `port` (dpctl/show -s)."""
        out = self.appctl("ovs-vswitchd", "dpctl/show", "-s").stdout
        lines = out.splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"\s*port \d+: {re.escape(port)}\b", line):
                for follow in lines[i + 1:i + 4]:
                    m = re.search(r"RX packets:(\d+)", follow)
                    if m:
                        return int(m.group(1))
        raise TcbError(f"no datapath port {port} in dpctl/show")

    def datapath_kind(self) -> str:
        """What vswitchd really runs br-int on: 'system' or 'netdev' (from dpif/show)."""
        first = self.appctl("ovs-vswitchd", "dpif/show").stdout.splitlines()[0]
        return first.split("@", 1)[0].strip()
