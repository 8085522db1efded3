"""The lab of tcbypass: KubeVirt/Kube-OVN nodes emulated on this machine, and
what runs on them. Its own distribution (lab/pyproject.toml) and door
(`tcbypass-lab`, cli.py); the node tool (`tcbypass`) never imports it.

The emulated node
  sandbox    virt-launcher pods wired as KubeVirt and Kube-OVN wire them, on
  ovs        a private Open vSwitch (kernel datapath where it loads, else userspace)
  wirings    the other KubeVirt bindings (masquerade, passt, macvtap, SR-IOV, ...)
  agentproc  `tcbypass agent` as a child process of a node
  streams    sequence-numbered UDP streams and pings, for loss figures
  kobjects   the kernel's BPF objects, counted

Real guests
  guest      a qemu guest on a pod's tap, driven over its serial console
  initramfs  the guest's kernel and initramfs;  accel  KVM or TCG;  console, procs, qemu, dhcp
  kernels    the kernel matrix: the tests in guests on other kernels
             (kernel_image: their cached images; kernel_results: what a run found)
  container  the DaemonSet's pod in podman

What the lab runs
  demo       `tcbypass-lab demo`
  bench      `tcbypass-lab bench`: scenarios, traffic, costs, minimal (the reference), results, report
  scale      `tcbypass-lab bench scale N`: a node full of VM pods
"""
