"""tcbypass: a tc eBPF fast path past the in-pod bridge of KubeVirt VMs."""

__version__ = "0.1.0"
