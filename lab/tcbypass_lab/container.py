"""Run the agent's DaemonSet with podman, the way a kubelet would run its pod,
on the emulated node (sandbox.py). The contract test (tests/image/) uses it.

`AgentPod.from_daemonset` reads what the pod asks of the node: host
namespaces, capabilities, hostPath mounts and their propagation, the
security options. `podman_args` turns each field into podman's flag for it.
A field it does not know is an error rather than ignored, so the DaemonSet
cannot ask for something the contract test never ran.

Two mappings stand in for a real node, and say so:
- hostNetwork: the container joins the sandbox node's network namespace
  (`--network ns:PATH`), because that is where the private OVS keeps its
  ports; the machine's own namespace has none of them. Without hostNetwork
  the container gets a namespace of its own (`--network none`).
- hostPath: a caller may point a host path somewhere else (the test's own
  bpffs for /sys/fs/bpf, the sandbox OVS's run directory for
  /run/openvswitch). Every other path is the machine's own.

podman runs here as ../shared/ENVIRONMENT.md says it must: with runc, and a
private containers.conf (no default ulimits, the cgroupfs manager, and no
network unless asked) passed in $CONTAINERS_CONF, never the machine's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERS_CONF = """\
[containers]
default_ulimits = []
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
"""

PROPAGATION = {"None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}
# Pod and container fields that ask nothing of the node, or that only a cluster acts on.
_INERT_POD = {"dnsPolicy", "priorityClassName", "nodeSelector", "tolerations", "terminationGracePeriodSeconds",
              "containers", "volumes", "hostNetwork", "hostPID"}
_INERT_CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "securityContext",
                    "resources", "livenessProbe", "volumeMounts"}
_SECURITY = {"privileged", "capabilities", "seccompProfile", "readOnlyRootFilesystem", "allowPrivilegeEscalation"}


class ContractError(ValueError):
    """The DaemonSet holds something this module cannot run faithfully."""


@dataclass(frozen=True)
class HostMount:
    volume: str
    host_path: str
    mount_path: str
    read_only: bool = False
    propagation: str = "None"  # Kubernetes' names: None, HostToContainer, Bidirectional
    host_type: str = ""  # the hostPath type: Directory, DirectoryOrCreate, ...


@dataclass(frozen=True)
class AgentPod:
    """What the agent's pod template asks of a node."""

    image: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    host_network: bool = False
    host_pid: bool = False
    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    mounts: tuple[HostMount, ...] = ()
    seccomp: str = ""  # RuntimeDefault, Unconfined, or "" (Kubernetes then runs it unconfined)
    read_only_root: bool = False
    no_new_privileges: bool = False
    memory_limit: str = ""
    grace_seconds: int = 30
    metrics_port: int = 0
    liveness_path: str = ""

    @classmethod
    def from_daemonset(cls, path: str | Path) -> "AgentPod":
        import yaml

        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        [ds] = [d for d in docs if d.get("kind") == "DaemonSet"]
        pod = ds["spec"]["template"]["spec"]
        _only(pod, _INERT_POD, "pod spec")
        [ctr] = pod["containers"]
        _only(ctr, _INERT_CONTAINER, "container")
        sec = ctr.get("securityContext", {})
        _only(sec, _SECURITY, "securityContext")
        caps = sec.get("capabilities", {})
        _only(caps, {"add", "drop"}, "capabilities")
        volumes = {}
        for vol in pod.get("volumes", []):
            _only(vol, {"name", "hostPath"}, f"volume {vol.get('name')}")
            volumes[vol["name"]] = vol["hostPath"]
        mounts = []
        for m in ctr.get("volumeMounts", []):
            _only(m, {"name", "mountPath", "readOnly", "mountPropagation"}, f"volumeMount {m.get('name')}")
            host = volumes[m["name"]]
            mounts.append(HostMount(m["name"], host["path"], m["mountPath"], bool(m.get("readOnly", False)),
                                    m.get("mountPropagation", "None"), host.get("type", "")))
        ports = {p.get("name"): p["containerPort"] for p in ctr.get("ports", [])}
        probe = ctr.get("livenessProbe", {}).get("httpGet", {})
        env = []
        for e in ctr.get("env", []):
            _only(e, {"name", "value"}, f"env {e.get('name')}")
            env.append((e["name"], str(e["value"])))
        return cls(
            image=ctr["image"],
            command=tuple(ctr.get("command", ())) + tuple(ctr.get("args", ())),
            env=tuple(env),
            host_network=bool(pod.get("hostNetwork", False)),
            host_pid=bool(pod.get("hostPID", False)),
            privileged=bool(sec.get("privileged", False)),
            cap_add=tuple(caps.get("add", ())),
            cap_drop=tuple(caps.get("drop", ())),
            mounts=tuple(mounts),
            seccomp=sec.get("seccompProfile", {}).get("type", ""),
            read_only_root=bool(sec.get("readOnlyRootFilesystem", False)),
            no_new_privileges=sec.get("allowPrivilegeEscalation") is False,
            memory_limit=ctr.get("resources", {}).get("limits", {}).get("memory", ""),
            grace_seconds=int(pod.get("terminationGracePeriodSeconds", 30)),
            metrics_port=int(ports.get(probe.get("port"), probe.get("port", 0)) or 0),
            liveness_path=probe.get("path", ""),
        )

    # --- one privilege less -----------------------------------------------------------
    def privileges(self) -> list[str]:
        """Every privilege the pod asks for, by the name `without` takes."""
        out = [f"cap:{c}" for c in self.cap_add]
        out += [f"mount:{m.volume}" for m in self.mounts]
        out += [f"propagation:{m.volume}" for m in self.mounts if m.propagation != "None"]
        out += [n for n, on in (("hostNetwork", self.host_network), ("hostPID", self.host_pid),
                                ("privileged", self.privileged)) if on]
        return out

    def without(self, privilege: str) -> "AgentPod":
        """This pod with one privilege taken away (a name from `privileges()`)."""
        kind, _, what = privilege.partition(":")
        if privilege not in self.privileges():
            raise ContractError(f"the pod does not ask for {privilege}")
        if kind == "cap":
            return dataclasses.replace(self, cap_add=tuple(c for c in self.cap_add if c != what))
        if kind == "mount":
            return dataclasses.replace(self, mounts=tuple(m for m in self.mounts if m.volume != what))
        if kind == "propagation":
            return dataclasses.replace(self, mounts=tuple(dataclasses.replace(m, propagation="None")
                                                          if m.volume == what else m for m in self.mounts))
        return dataclasses.replace(self, **{{"hostNetwork": "host_network", "hostPID": "host_pid",
                                             "privileged": "privileged"}[privilege]: False})

    def mount(self, volume: str) -> HostMount:
        return next(m for m in self.mounts if m.volume == volume)


def _only(obj: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ContractError(f"{where}: {', '.join(unknown)}: lab/tcbypass_lab/container.py does not know how to run "
                            "this on podman; teach it (podman_args) before the DaemonSet asks for it")


def _memory(quantity: str) -> str:
    """A Kubernetes memory quantity as podman takes it (binary units)."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if quantity.endswith(suffix):
            return quantity[:-2] + unit
    return quantity


def podman_args(pod: AgentPod, name: str, node_netns: str, host_paths: dict[str, str] | None = None,
                command: tuple[str, ...] | None = None) -> list[str]:
    """`podman run` arguments for the pod (without `run`): each field of the
    DaemonSet becomes its podman flag; `command` replaces the container's."""
    host_paths = host_paths or {}
    args = ["--name", name, "--network", f"ns:{node_netns}" if pod.host_network else "none"]
    if pod.host_pid:
        args += ["--pid", "host"]
    if pod.privileged:
        args.append("--privileged")
    args += [f"--cap-drop={c.lower()}" for c in pod.cap_drop]
    args += [f"--cap-add={c}" for c in pod.cap_add]
    if pod.seccomp in ("", "Unconfined"):  # Kubernetes' default without a seccompProfile is unconfined
        args += ["--security-opt", "seccomp=unconfined"]
    elif pod.seccomp != "RuntimeDefault":  # RuntimeDefault: podman's own profile, as containerd's is the kubelet's
        raise ContractError(f"seccompProfile {pod.seccomp} is not mapped")
    if pod.no_new_privileges:
        args += ["--security-opt", "no-new-privileges"]
    if pod.read_only_root:
        args += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs of its own
    if pod.memory_limit:
        args += ["--memory", _memory(pod.memory_limit)]
    args += ["--stop-timeout", str(pod.grace_seconds)]
    for key, value in pod.env:
        args += ["--env", f"{key}={value}"]
    for m in pod.mounts:
        source = host_paths.get(m.host_path, m.host_path)
        if m.host_type == "DirectoryOrCreate":
            os.makedirs(source, exist_ok=True)
        elif m.host_type == "Directory" and not os.path.isdir(source):
            raise ContractError(f"hostPath {source} (volume {m.volume}) must be a directory and is not")
        args += ["--volume", f"{source}:{m.mount_path}:{'ro' if m.read_only else 'rw'},{PROPAGATION[m.propagation]}"]
    run = tuple(command) if command else pod.command
    return args + ["--entrypoint", run[0], pod.image, *run[1:]]


@dataclass
class Podman:
    """podman with this machine kind's settings, for one test run. Use `with`:
    every container it started is removed on exit."""

    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tcbypass-podman-"))
    started: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conf = os.path.join(self.workdir, "containers.conf")
        Path(self.conf).write_text(CONTAINERS_CONF)

    def __enter__(self) -> "Podman":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "CONTAINERS_CONF": self.conf})
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def start(self, pod: AgentPod, name: str, node_netns: str, host_paths: dict[str, str] | None = None,
              command: tuple[str, ...] | None = None) -> str:
        """Start the pod's container in the background; its name."""
        self.started.append(name)
        self("run", "--detach", *podman_args(pod, name, node_netns, host_paths, command))
        return name

    def exec(self, name: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self("exec", name, *cmd, check=False, timeout=timeout)

    def stop(self, name: str, grace: int) -> tuple[int, float]:
        """SIGTERM, as the kubelet sends it; (exit code, seconds it took)."""
        started = time.monotonic()
        self("stop", "--time", str(grace), name, timeout=grace + 30)
        code = int(self("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
        return code, time.monotonic() - started

    def logs(self, name: str) -> str:
        proc = self("logs", name, check=False)
        return proc.stdout + proc.stderr

    def running(self, name: str) -> bool:
        proc = self("inspect", "--format", "{{.State.Running}}", name, check=False)
        return proc.stdout.strip() == "true"

    def remove(self, name: str) -> None:
        self("rm", "--force", "--time", "0", name, check=False)
        with contextlib.suppress(ValueError):
            self.started.remove(name)

    def close(self) -> None:
        for name in list(self.started):
            self.remove(name)
        with contextlib.suppress(OSError):
            os.unlink(self.conf)
            os.rmdir(self.workdir)


def metrics(node_netns: str, port: int, path: str = "/metrics", timeout: float = 2.0) -> str | None:
    """GET the agent's metrics from inside the node's network namespace, as the
    kubelet's liveness probe does; None when nothing answers."""
    from tcbypass import netns

    def get() -> str | None:
        import urllib.request
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout).read().decode()
        except OSError:
            return None
    return netns.run_in(node_netns, get)


def status_json(out: str) -> dict[str, dict]:
    """`tcbypass status --json` output, by attachment name."""
    return {row["name"]: row for row in json.loads(out)}
