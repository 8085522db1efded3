"""lab/tcbypass_lab/container.py: the DaemonSet becomes podman flags field by field,
and a field it cannot map is refused rather than dropped."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tcbypass_lab.container import AgentPod, ContractError, podman_args

DAEMONSET = Path(__file__).resolve().parents[2] / "deploy" / "daemonset.yaml"


def test_every_field_of_the_daemonset_becomes_its_podman_flag(tmp_path):
    pod = AgentPod.from_daemonset(DAEMONSET)
    args = podman_args(pod, "agent", "/var/run/netns/node", {"/sys/fs/bpf": "/run/bpf-of-this-test",
                                                             "/run/tcbypass": str(tmp_path / "run"),
                                                             "/var/run/netns": str(tmp_path / "netns"),
                                                             "/run/openvswitch": str(tmp_path)})
    line = " ".join(args)
    assert "--network ns:/var/run/netns/node" in line and "--pid host" in line
    assert "--cap-drop=all --cap-add=NET_ADMIN --cap-add=SYS_ADMIN --cap-add=SYS_PTRACE" in line
    assert "--privileged" not in args and "seccomp=unconfined" not in line  # RuntimeDefault: podman's profile
    assert "--read-only --read-only-tmpfs=false" in line and "--memory 256m" in line
    assert "--env TCBYPASS_OVSDB=unix:/run/openvswitch/db.sock" in line
    assert "--volume /run/bpf-of-this-test:/sys/fs/bpf:rw,rslave" in line
    assert f"--volume {tmp_path}:/run/openvswitch:ro,rprivate" in line
    assert f"--volume {tmp_path / 'netns'}:/var/run/netns:rw,rslave" in line
    assert (tmp_path / "run").is_dir(), "a DirectoryOrCreate hostPath is created, as the kubelet does"
    assert args[-6:] == ["--entrypoint", "tcbypass", pod.image, "agent", "--metrics-address", "0.0.0.0:9477"]


def test_taking_one_privilege_away_changes_only_that(tmp_path):
    pod = AgentPod.from_daemonset(DAEMONSET)
    assert pod.without("cap:SYS_PTRACE").cap_add == ("NET_ADMIN", "SYS_ADMIN")
    assert [m.volume for m in pod.without("mount:ovs-run").mounts] == ["bpffs", "netns", "tcbypass-run"]
    assert pod.without("propagation:netns").mount("netns").propagation == "None"
    assert pod.without("hostPID").host_pid is False and pod.without("hostPID").host_network is True
    with pytest.raises(ContractError):
        pod.without("cap:SYS_MODULE")


def test_a_field_the_lab_cannot_run_is_refused(tmp_path):
    text = DAEMONSET.read_text().replace("hostPID: true", "hostPID: true\n      hostIPC: true")
    (tmp_path / "ds.yaml").write_text(text)
    with pytest.raises(ContractError, match="hostIPC"):
        AgentPod.from_daemonset(tmp_path / "ds.yaml")
    spec = textwrap.dedent("""
        apiVersion: apps/v1
        kind: DaemonSet
        metadata: {name: x}
        spec:
          template:
            spec:
              containers:
                - name: a
                  image: i
                  securityContext: {runAsUser: 1000}
    """)
    (tmp_path / "user.yaml").write_text(spec)
    with pytest.raises(ContractError, match="runAsUser"):
        AgentPod.from_daemonset(tmp_path / "user.yaml")
