"""The lab: an emulated node on this machine, for the demo, the benchmarks
and the tests. Nothing here runs on a real node.

sandbox  KubeVirt-like virt-launcher pods on a private Open vSwitch
guest    a real qemu guest on a pod's tap
kernels  the kernel matrix: the tests, in qemu guests running other kernels
kernel_image  the cached Debian guest images the matrix boots
kernel_results  what a matrix run found, and its report
demo     `tcbypass demo`
bench    `tcbypass bench`: the run, with scenarios, traffic, costs, results and report
minimal  the bench's reference program (minimal.c) and hooking programs for a scenario
scale    `tcbypass bench scale N`: a node full of VM pods
"""
