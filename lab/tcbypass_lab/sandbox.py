"""Emulated KubeVirt/Kube-OVN wiring on one machine, for the demo, the
benchmark and the tests.

It builds, with network namespaces, exactly what virt-handler and Kube-OVN
build on a node (see shared/KUBEVIRT.md):

    vm netns                 virt-launcher pod netns                     node netns (private OVS)
    eth0 (VM MAC, VM IP) ==  tap0 --[ k6t-eth0 ]-- eth0-nic  <-veth->  <cid12>_h in br-int
                             eth0: stand-in for KubeVirt's dummy (pod MAC)

The VM side is a veth (`vm_link="veth"`), or a real tap device for a real
guest (`vm_link="tap"`, used by the qemu tests). Every object carries a
random tag in its name and `Sandbox.close()` removes all of them, also after
a failure. Nothing here touches a system OVS: the private one (ovs.py) runs
its own ovsdb-server and ovs-vswitchd from a private run directory, inside
the node namespace, on OVS's kernel datapath where openvswitch.ko loads and
its userspace datapath elsewhere (`datapath`, $TCBYPASS_DATAPATH).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

from .ovs import NETDEV, PrivateOvs, choose_datapath

NETNS_DIR = "/var/run/netns"


def sh(*args: str, check: bool = True, netns: str | None = None, timeout: float = 30,
       env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command (inside `netns` when given, via nsenter so bpffs stays visible)."""
    cmd = list(args)
    if netns:
        cmd = ["nsenter", f"--net={NETNS_DIR}/{netns}", "--"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ping(netns: str, ip: str, count: int = 3, interval: float = 0.05, wait: float = 1.0) -> tuple[int, int]:
    """(sent, received) of `count` ICMP echoes from inside `netns`."""
    out = sh("ping", "-c", str(count), "-i", str(interval), "-W", str(wait), ip, netns=netns, check=False,
             timeout=count * (interval + wait) + 10).stdout
    for line in out.splitlines():
        if "packets transmitted" in line:
            parts = line.split(",")
            return int(parts[0].split()[0]), int(parts[1].split()[0])
    return count, 0


def wait_for_ping(netns: str, ip: str, timeout: float = 10.0) -> bool:
    """Ping until one reply (links that just came up need a moment); False after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(netns, ip, count=1, wait=0.5)[1] == 1:
            return True
    return False


def tcp_transfer(client_ns: str, server_ns: str, server_ip: str, nbytes: int = 1 << 20, port: int = 19766,
                 timeout: float = 20) -> int:
    """Send `nbytes` over TCP from `client_ns` to a listener in `server_ns`; bytes that arrived."""
    server = subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR}/{server_ns}", "--", "python3", "-c",
         "import socket, sys\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         f"s.bind(('{server_ip}', {port})); s.listen(1); s.settimeout({timeout})\n"
         f"c, _ = s.accept(); c.settimeout({timeout}); n = 0\n"
         "while True:\n    d = c.recv(65536)\n    if not d: break\n    n += len(d)\n"
         "print(n)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(50):  # until the listener is up
            probe = sh("ss", "-Hltn", f"sport = :{port}", netns=server_ns, check=False).stdout
            if probe.strip():
                break
            time.sleep(0.05)
        sh("python3", "-c", "import socket\n"
           f"s = socket.create_connection(('{server_ip}', {port}), timeout={timeout})\n"
           f"s.sendall(b'x' * {nbytes}); s.close()\n", netns=client_ns, check=False, timeout=timeout + 5)
        out, _ = server.communicate(timeout=timeout + 5)
        return int(out.strip() or 0)
    except (subprocess.TimeoutExpired, ValueError):
        return 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def mac_of(netns: str, dev: str) -> str:
    return json.loads(sh("ip", "-j", "link", "show", "dev", dev, netns=netns).stdout)[0]["address"]


def v6_of(ip: str) -> str:
    """The IPv6 address this lab pairs with an IPv4 one in a dual-stack pod: 10.16.0.5 -> fd00:10:16::5."""
    a, b, _c, d = ip.split(".")
    return f"fd00:{a}:{b}::{d}"


def mac_for(seed: str) -> str:
    """A stable locally administered unicast MAC."""
    h = hashlib.sha256(seed.encode()).digest()
    return "0a:" + ":".join(f"{b:02x}" for b in h[:5])


@dataclass
class VmNic:
    """One bridge-bound NIC of an emulated VM, and the names KubeVirt gives its parts."""

    iface_id: str
    pod_ns: str  # the virt-launcher pod's netns name
    vm_ns: str  # the "VM" side netns ("" for a real guest on a tap)
    tap: str
    bridge: str
    nic: str
    dummy: str
    host_port: str  # the veth end in the node namespace (in OVS)
    mac: str
    ip: str
    prefix: int = 24
    vm_dev: str = "eth0"
    mtu: int = 1500  # the pod's MTU, which KubeVirt gives the tap
    ip6: str = ""  # its IPv6 address in a dual-stack pod (prefix 64)
    pod_dev: str = ""  # the pod NIC's name before KubeVirt renames it (default: the dummy's name)
    vmi: str = ""
    namespace: str = ""
    cid: str = ""  # the virt-launcher pod's container id (Kube-OVN names its ports after it)
    index: int = 0  # 0 for the primary NIC, then 1, 2, ... as KubeVirt numbers the VMI's interfaces
    queues: int = 1  # a real guest's tap: >1 makes it multi-queue (networkInterfaceMultiqueue)


def stop_all(procs: list, grace: float) -> None:
    """Terminate the processes still running, wait `grace` seconds for each,
    kill those that stay, and empty the list."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    procs.clear()


@dataclass
class Sandbox:
    """A node with a private OVS, pods wired like Kube-OVN and KubeVirt. Use `with`."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    ovs: bool = True
    datapath: str = ""  # system | netdev | auto; "" = $TCBYPASS_DATAPATH, else auto (lab/ovs.py)
    netns_names: list = field(default_factory=list)
    run_dir: str = ""
    bridge: str = "br-int"
    mtu: int = 0  # Kube-OVN's MTU for every pod NIC (1400 on its Geneve overlay); 0: the kernel's default
    _children: list = field(default_factory=list)  # helper processes started with spawn()
    _servers: dict = field(default_factory=dict)  # server pod name -> its container id
    switch: PrivateOvs | None = None

    # --- lifecycle --------------------------------------------------------
    def __enter__(self) -> "Sandbox":
        try:
            self.node = self.add_netns("node")
            if self.ovs:
                self._start_ovs()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        stop_all(self._children, grace=5)
        if self.switch is not None:
            self.switch.close()
        for name in reversed(self.netns_names):
            sh("ip", "netns", "delete", name, check=False)
        self.netns_names.clear()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def add_netns(self, role: str) -> str:
        name, n = f"tcb{self.tag}-{role}", 1
        while os.path.exists(self.netns_path(name)):  # a second pod of the same VMI (a migration)
            n += 1
            name = f"tcb{self.tag}-{role}-{n}"
        sh("ip", "netns", "add", name)
        self.netns_names.append(name)
        sh("ip", "link", "set", "lo", "up", netns=name)
        return name

    @staticmethod
    def netns_path(name: str) -> str:
        return f"{NETNS_DIR}/{name}"

    def spawn(self, netns: str, *args: str, **popen) -> subprocess.Popen:
        """Start a helper process inside `netns` (nsenter execs it, so the pid is the process's own);
        close() stops it."""
        child = subprocess.Popen(["nsenter", f"--net={NETNS_DIR}/{netns}", "--", *args],
                                 stdin=subprocess.DEVNULL, **popen)
        self._children.append(child)
        return child

    def held_by_process(self, netns: str) -> str:
        """A process inside `netns` (close() stops it); its /proc/PID/ns/net."""
        holder = self.spawn(netns, "setpriv", "--pdeathsig", "KILL", "sleep", "900")
        path = f"/proc/{holder.pid}/ns/net"
        for _ in range(200):  # until nsenter has entered the namespace
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.stat(self.netns_path(netns)).st_ino:
                    return path
            time.sleep(0.01)
        raise RuntimeError(f"no process came to hold {netns}")

    # --- private OVS --------------------------------------------------------
    @property
    def ovsdb_url(self) -> str:
        return self.switch.url

    def _start_ovs(self) -> None:
        self.run_dir = f"/run/tcbypass-sandbox-{self.tag}"
        self.switch = PrivateOvs(self.run_dir, self.node, choose_datapath(self.datapath), self.bridge)
        self.datapath = self.switch.datapath
        self.switch.start()

    @property
    def vswitchd_pid(self) -> int:
        return self.switch.pid("ovs-vswitchd")

    def vsctl(self, *args: str) -> str:
        return self.switch.vsctl(*args)

    def restart_ovsdb(self, away: float = 0.0) -> None:
        """Stop ovsdb-server and start it again on the same socket (for reconnect tests)."""
        self.switch.restart_ovsdb(away)

    # --- pods ---------------------------------------------------------------
    def plug(self, pod_ns: str, pod_dev: str, pod_name: str, namespace: str, iface_id: str, ip: str,
             container_id: str, suffix: str = "", pod_netns: str = "") -> str:
        """What Kube-OVN's CNI does: a veth, the host end in br-int with its external_ids.
        Both ends get the MTU (pkg/daemon/ovs_linux.go, setupVethPair)."""
        host = self.host_port_name(container_id, suffix)
        mtu = ("mtu", str(self.mtu)) if self.mtu else ()
        sh("ip", "link", "add", host, "netns", self.node, *mtu, "type", "veth", "peer", "name", pod_dev,
           "netns", pod_ns, *mtu)
        sh("ip", "link", "set", host, "up", netns=self.node)
        if self.ovs:
            self.add_kubeovn_port(host, pod_ns, pod_name, namespace, iface_id, ip, pod_netns)
        return host

    def plug_internal(self, pod_ns: str, mac: str, pod_name: str, namespace: str, iface_id: str, ip: str,
                      container_id: str, suffix: str = "", pod_netns: str = "") -> str:
        """Kube-OVN's internal-port pod NIC (pod_nic_type internal-port, Kube-OVN up to 1.14:
        pkg/daemon/ovs_linux.go, configureNicWithInternalPort): an OVS internal port
        <containerID[:12]>_c with the pod's external_ids, given the pod's MAC and moved into
        the pod under its own name (renaming it would make OVS recreate it). No veth, no host
        side. Returns the port's name."""
        name = f"{container_id[:12 - len(suffix)]}{suffix}_c"
        self.add_kubeovn_port(name, pod_ns, pod_name, namespace, iface_id, ip, pod_netns, kind="internal")
        for _ in range(200):  # vswitchd creates the device
            if sh("ip", "link", "show", name, netns=self.node, check=False).returncode == 0:
                break
            time.sleep(0.02)
        if self.mtu:  # Kube-OVN asks OVS for the MTU (configureNic: mtu_request), which sets the device's
            self.vsctl("set", "interface", name, f"mtu_request={self.mtu}")
            self._wait_mtu(name, self.node)
        sh("ip", "link", "set", name, "address", mac, "netns", pod_ns, netns=self.node)
        return name

    def _wait_mtu(self, dev: str, ns: str) -> None:
        for _ in range(200):
            if json.loads(sh("ip", "-j", "link", "show", "dev", dev, netns=ns).stdout)[0]["mtu"] == self.mtu:
                return
            time.sleep(0.02)
        raise RuntimeError(f"OVS did not give {dev} the MTU {self.mtu}")

    @staticmethod
    def host_port_name(container_id: str, suffix: str = "") -> str:
        """Kube-OVN's name for the node end of a pod NIC: <containerID[:12]>_h."""
        return f"{container_id[:12 - len(suffix)]}{suffix}_h"

    def add_kubeovn_port(self, host: str, pod_ns: str, pod_name: str, namespace: str, iface_id: str,
                         ip: str, pod_netns: str = "", kind: str = "") -> None:
        """Put the node device `host` into br-int with the external_ids Kube-OVN writes for a pod NIC
        (`pod_netns`: how the row names the pod's namespace, by default its file under /var/run/netns;
        `kind`: the Interface's type, "internal" for an internal port OVS creates)."""
        ids = {"iface-id": iface_id, "vendor": "kube-ovn", "pod_name": pod_name, "pod_namespace": namespace,
               "ip": ip, "pod_netns": pod_netns or self.netns_path(pod_ns)}
        self.switch.add_port(host, ids, kind)

    def add_server_pod(self, name: str, ip: str, namespace: str = "default", prefix: int = 24,
                       dual_stack: bool = False) -> str:
        """An ordinary pod on the same node: the VM's peer for traffic (IPv6 too: v6_of(ip))."""
        ns = self.add_netns(f"srv-{name}"[:20])
        cid = secrets.token_hex(32)
        self.plug(ns, "eth0", name, namespace, f"{name}.{namespace}", f"{ip},{v6_of(ip)}" if dual_stack else ip,
                  cid)
        sh("ip", "link", "set", "eth0", "address", mac_for(f"{self.tag}{name}"), netns=ns)
        sh("ip", "addr", "add", f"{ip}/{prefix}", "dev", "eth0", netns=ns)
        if dual_stack:
            sh("ip", "-6", "addr", "add", f"{v6_of(ip)}/64", "dev", "eth0", "nodad", netns=ns)
        sh("ip", "link", "set", "eth0", "up", netns=ns)
        self.offloads_as_kubeovn(ns, "eth0")
        self._servers[name] = cid
        return ns

    def host_port_of(self, server: str) -> str:
        """The node end of server pod `server`'s veth."""
        return self.host_port_name(self._servers[server])

    def offloads_as_kubeovn(self, ns: str, dev: str) -> None:
        """On the userspace datapath Kube-OVN turns tx checksumming off in the pod:
        that datapath cannot finish partial checksums."""
        if self.ovs and self.datapath == NETDEV:
            sh("ethtool", "-K", dev, "tx", "off", netns=ns, check=False)

    def add_vm(self, vmi: str, ips: list[str], namespace: str = "default", vm_link: str = "veth",
               providers: tuple[str, ...] = (), managed_tap: bool = False,
               netns_by_pid: bool = False, dual_stack: bool = False,
               pod_nic_type: str = "veth-pair", macs: Sequence[str] = (), queues: int = 1) -> list[VmNic]:
        """A virt-launcher pod with bridge binding for VMI `vmi`: one NIC per IP.

        The first NIC is the primary (tap0, k6t-eth0, eth0-nic, dummy eth0);
        the others are secondary (tap<hash>, k6t-<hash>, <hash>-nic, dummy
        pod<hash>), each plugged into OVS by Kube-OVN as provider
        `providers[i-1]`. `managed_tap`: the managedTap binding, the same
        wiring without the address virt-launcher's DHCP server answers on.
        `netns_by_pid`: Kube-OVN's rows name the pod's namespace as
        /proc/PID/ns/net of a process in it, as under runtimes that keep no
        namespace file (cri-dockerd), instead of /var/run/netns/NAME.
        `dual_stack`: each NIC also gets the IPv6 address v6_of(its IPv4).
        `pod_nic_type`: how Kube-OVN plugs the pod (veth-pair, or internal-port: an
        OVS internal port moved into the pod, which KubeVirt then renames and bridges).
        `macs`: the NICs' MACs (Kube-OVN's allocation), when they must be given: the
        target pod of a live migration has the source pod's.
        `queues`: for a real guest (vm_link "tap"), taps with that many queues, as KubeVirt
        makes them for networkInterfaceMultiqueue (one per vCPU; cmd/virt-chroot/tap-device-maker.go
        creates a multi-queue tap when asked for more than one).
        """
        pod_ns = self.add_netns(f"pod-{vmi}"[:20])
        pod_netns = self.held_by_process(pod_ns) if netns_by_pid else ""
        vm_ns = self.add_netns(f"vm-{vmi}"[:20]) if vm_link == "veth" else ""
        pod = VmNic(iface_id="", pod_ns=pod_ns, vm_ns=vm_ns, tap="", bridge="", nic="", dummy="", host_port="",
                    mac="", ip="", vmi=vmi, namespace=namespace, cid=secrets.token_hex(32), queues=queues)
        return [self._add_nic(pod, i, ip, providers[i - 1] if 0 < i <= len(providers) else f"net{i}",
                              managed_tap=managed_tap, pod_netns=pod_netns, dual_stack=dual_stack,
                              pod_nic_type=pod_nic_type, mac=macs[i] if i < len(macs) else "")
                for i, ip in enumerate(ips)]

    def hotplug_nic(self, pod: list[VmNic], ip: str, provider: str) -> VmNic:
        """A NIC hot-plugged into the running VM of this pod (KubeVirt's NIC hotplug,
        bridge binding on a secondary network): Kube-OVN plugs the pod into the
        network's switch, then virt-handler adds k6t-<hash>, tap<hash> and <hash>-nic
        to the running pod (pkg/network/setup/netpod builds them as for any secondary
        NIC; the hash names the network, pkg/network/namescheme)."""
        nic = self._add_nic(pod[0], 1 + max(n.index for n in pod), ip, provider,
                            dual_stack=bool(pod[0].ip6))
        pod.append(nic)
        return nic

    def unplug_nic(self, pod: list[VmNic], nic: VmNic) -> None:
        """A hot-plugged NIC unplugged: virt-handler removes its bridge, tap and pod NIC
        from the pod, and Kube-OVN takes the port out of OVS."""
        for dev in (nic.tap, nic.bridge, nic.nic, nic.dummy):
            sh("ip", "link", "del", dev, netns=nic.pod_ns, check=False)
        if nic.vm_ns:
            sh("ip", "link", "del", nic.vm_dev, netns=nic.vm_ns, check=False)
        if self.ovs:
            self.switch.del_port(nic.host_port)
        sh("ip", "link", "del", nic.host_port, netns=self.node, check=False)
        pod.remove(nic)

    def _add_nic(self, pod: VmNic, i: int, ip: str, provider: str, managed_tap: bool = False, pod_netns: str = "",
                 dual_stack: bool = False, pod_nic_type: str = "veth-pair", mac: str = "") -> VmNic:
        """NIC number `i` of the VM pod `pod` (its namespaces, VMI and container id): Kube-OVN's
        port, then KubeVirt's bridge binding."""
        vmi, namespace = pod.vmi, pod.namespace
        if i == 0:
            names = dict(tap="tap0", bridge="k6t-eth0", nic="eth0-nic", dummy="eth0")
            iface_id, suffix, vm_dev = f"{vmi}.{namespace}", "", "eth0"
        else:
            h = hashlib.sha256(provider.encode()).hexdigest()[:11]  # KubeVirt hashes the network name
            names = dict(tap=f"tap{h}", bridge=f"k6t-{h}", nic=f"{h}-nic", dummy=f"pod{h}")
            iface_id, suffix, vm_dev = f"{vmi}.{namespace}.{provider}", f"_{i}", f"eth{i}"
        mac = mac or mac_for(f"{self.tag}{vmi}{i}")
        nic = VmNic(iface_id=iface_id, pod_ns=pod.pod_ns, vm_ns=pod.vm_ns, mac=mac, ip=ip, vm_dev=vm_dev,
                    host_port="", ip6=v6_of(ip) if dual_stack else "", vmi=vmi, namespace=namespace, cid=pod.cid,
                    index=i, queues=pod.queues, **names)
        ips_id = f"{ip},{nic.ip6}" if nic.ip6 else ip
        if pod_nic_type == "internal-port":
            nic.host_port = nic.pod_dev = self.plug_internal(pod.pod_ns, mac, vmi, namespace, iface_id, ips_id,
                                                             pod.cid, suffix, pod_netns)
        else:
            nic.host_port = self.plug(pod.pod_ns, names["dummy"], vmi, namespace, iface_id, ips_id, pod.cid, suffix,
                                      pod_netns)
            sh("ip", "link", "set", names["dummy"], "address", mac, netns=pod.pod_ns)  # the MAC Kube-OVN allocated
        self._bridge_bind(nic, dhcp_address=None if managed_tap else f"169.254.75.1{i}/32")
        return nic

    def _bridge_bind(self, nic: VmNic, dhcp_address: str | None = "169.254.75.10/32") -> None:
        """What virt-handler does for bridge binding (managedTap: no `dhcp_address`), inside the pod.

        KubeVirt's spec, as pkg/network/setup/netpod/netpod.go (bridgeBindingSpec) builds it and
        netpod_test.go ("setup bridge binding with IP and a static route") spells it out, applied
        in its order: the bridge (its MAC left to the kernel; 169.254.75.1N/32 for the DHCP
        server; tx checksumming off, as releases before 1.8 set it), the pod NIC renamed
        <name>-nic (a port of the bridge, learning off, no addresses, the bridge's MAC copied
        onto it), the tap (the pod's MTU), a dummy of the old name holding the pod's MAC and
        addresses, never brought up, and net.ipv4.conf.all.arp_ignore = 1."""
        p = nic.pod_ns
        pod_dev = nic.pod_dev or nic.dummy
        mtu = json.loads(sh("ip", "-j", "link", "show", "dev", pod_dev, netns=p).stdout)[0]["mtu"]
        sh("ip", "link", "add", nic.bridge, "type", "bridge", netns=p)
        sh("ethtool", "-K", nic.bridge, "tx", "off", netns=p, check=False)
        if dhcp_address:
            sh("ip", "addr", "add", dhcp_address, "dev", nic.bridge, netns=p)
        sh("ip", "link", "set", nic.bridge, "up", netns=p)
        # nmstate's Apply (pkg/network/driver/nmstate/spec.go) renames, sets the
        # copied MAC, then the master, then addresses, then up.
        sh("ip", "link", "set", pod_dev, "down", netns=p)
        sh("ip", "link", "set", pod_dev, "name", nic.nic, netns=p)
        sh("ip", "link", "set", nic.nic, "address", mac_of(p, nic.bridge), netns=p)  # CopyMacFrom
        sh("ip", "link", "set", nic.nic, "master", nic.bridge, netns=p)
        sh("bridge", "link", "set", "dev", nic.nic, "learning", "off", netns=p)
        sh("ip", "addr", "flush", "dev", nic.nic, netns=p)
        sh("ip", "link", "set", nic.nic, "up", netns=p)
        nic.mtu = mtu
        self._plug_vm(nic)
        # No dummy driver in every kernel: a bridge without ports holds a MAC and
        # addresses and carries nothing, which is all KubeVirt's dummy does.
        sh("ip", "link", "add", nic.dummy, "type", "bridge", netns=p)
        sh("ip", "link", "set", nic.dummy, "address", nic.mac, "mtu", str(mtu), netns=p)
        sh("ip", "addr", "add", f"{nic.ip}/{nic.prefix}", "dev", nic.dummy, netns=p)
        if nic.ip6:
            sh("ip", "-6", "addr", "add", f"{nic.ip6}/64", "dev", nic.dummy, "nodad", netns=p)
        sh("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1", netns=p)

    def serve_on_host_port(self, nic: VmNic, ip: str) -> None:
        """Without OVS: make the node end of the pod's veth the VM's peer."""
        sh("ip", "addr", "add", f"{ip}/{nic.prefix}", "dev", nic.host_port, netns=self.node)

    def pin_neighbours(self, nic: VmNic, server_ip: str) -> None:
        """Without OVS: static ARP entries both ways between the VM and the node end
        of its pod's veth, so that only a test's own frames cross (no ARP probes)."""
        sh("ip", "neigh", "replace", nic.ip, "lladdr", nic.mac, "dev", nic.host_port, "nud", "permanent",
           netns=self.node)
        sh("ip", "neigh", "replace", server_ip, "lladdr", mac_of(self.node, nic.host_port), "dev", nic.vm_dev,
           "nud", "permanent", netns=nic.vm_ns)

    def restart_vm(self, nic: VmNic) -> None:
        """What a VM restart does to the pod: the tap goes away and a new one
        (new ifindex) joins the bridge. Veth VMs get a new veth pair."""
        sh("ip", "link", "del", nic.tap, netns=nic.pod_ns)
        self._plug_vm(nic)

    def _plug_vm(self, nic: VmNic) -> None:
        """The VM's side: a tap on the bridge (a veth pair into the VM netns
        for emulated VMs, a real tap for qemu)."""
        p = nic.pod_ns
        if nic.vm_ns:
            sh("ip", "link", "add", nic.tap, "netns", p, "type", "veth", "peer", "name", nic.vm_dev,
               "netns", nic.vm_ns)
            v = nic.vm_ns
            # The guest takes the pod's MTU from KubeVirt's DHCP server (option 26).
            sh("ip", "link", "set", nic.vm_dev, "address", nic.mac, "mtu", str(nic.mtu), netns=v)
            sh("ip", "addr", "add", f"{nic.ip}/{nic.prefix}", "dev", nic.vm_dev, netns=v)
            if nic.ip6:
                sh("ip", "-6", "addr", "add", f"{nic.ip6}/64", "dev", nic.vm_dev, "nodad", netns=v)
            sh("ip", "link", "set", nic.vm_dev, "up", netns=v)
            self.offloads_as_kubeovn(v, nic.vm_dev)
        else:
            multi = ("multi_queue",) if nic.queues > 1 else ()
            sh("ip", "tuntap", "add", "dev", nic.tap, "mode", "tap", "vnet_hdr", *multi, netns=p)
        sh("ip", "link", "set", nic.tap, "mtu", str(nic.mtu), "master", nic.bridge, netns=p)
        sh("ip", "link", "set", nic.tap, "up", netns=p)

    def delete_pod(self, nics: list[VmNic], netns_first: bool = False) -> None:
        """What a pod deletion does on the node: Kube-OVN's CNI DEL takes the
        pod's ports out of br-int and deletes their host veths (kube-ovn
        pkg/daemon/ovs_linux.go, deleteNic), then the runtime deletes the
        pod's namespace. `netns_first`: the namespace goes first (a runtime
        that tears down before the CNI is called, or a crashed CNI)."""
        def unplug() -> None:
            if self.ovs:
                for nic in nics:
                    self.switch.del_port(nic.host_port)
            for nic in nics:
                sh("ip", "link", "del", nic.host_port, netns=self.node, check=False)

        def remove_namespaces() -> None:
            for name in dict.fromkeys(n for nic in nics for n in (nic.pod_ns, nic.vm_ns) if n):
                if name in self.netns_names:
                    sh("ip", "netns", "delete", name, check=False)
                    self.netns_names.remove(name)

        for step in ((remove_namespaces, unplug) if netns_first else (unplug, remove_namespaces)):
            step()

    def block_bridge_unicast(self, nic: VmNic) -> None:
        """Make the bridge unable to forward unicast between its ports:
        no learning, no unknown-unicast flooding, FDB flushed. Broadcast
        still floods, so ARP requests and DHCP still cross."""
        for dev in (nic.tap, nic.nic):
            sh("bridge", "link", "set", "dev", dev, "learning", "off", "flood", "off", netns=nic.pod_ns)
        sh("ip", "link", "set", nic.bridge, "type", "bridge", "ageing_time", "0", netns=nic.pod_ns, check=False)
        for dev in (nic.tap, nic.nic):
            for line in sh("bridge", "fdb", "show", "dev", dev, netns=nic.pod_ns).stdout.splitlines():
                mac = line.split()[0]
                if "permanent" in line:
                    continue
                sh("bridge", "fdb", "del", mac, "dev", dev, "master", netns=nic.pod_ns, check=False)


def destroy(tag: str) -> list[str]:
    """Remove a sandbox left up (demo --keep) by its tag: daemons, namespaces, run directory."""
    removed = []
    run_dir = f"/run/tcbypass-sandbox-{tag}"
    for daemon in ("ovs-vswitchd", "ovsdb-server"):
        with contextlib.suppress(OSError, ValueError):
            with open(f"{run_dir}/{daemon}.pid") as f:
                os.kill(int(f.read().strip()), signal.SIGTERM)
            removed.append(daemon)
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"tcb{tag}-"):
            sh("ip", "netns", "delete", name, check=False)
            removed.append(name)
    shutil.rmtree(run_dir, ignore_errors=True)
    return removed
