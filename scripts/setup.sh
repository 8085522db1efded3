#!/usr/bin/env bash
# Set up a machine to build, run and test tcbypass. Idempotent: run it again
# at any time. Debian 12 / Ubuntu 22.04+ as root.
#
#   scripts/setup.sh            system packages, kernel headers, bpffs, venv
#   TCBYPASS_SETUP=node scripts/setup.sh
#                               only what the node tool and its namespace tests need
#                               (the Vagrant box has it all, so provisioning there
#                               installs nothing from the network)
#
# The venv lives in .venv next to this checkout and sees the distribution's
# bcc (python3-bpfcc); bcc is never installed from PyPI (the PyPI "bcc" is an
# unrelated project).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
say() { printf 'setup: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup: run as root (it installs packages and mounts bpffs)" >&2; exit 1; }

packages=(
    python3-bpfcc bpfcc-tools libbpf1    # bcc compiles and loads the tc program
    python3-venv python3-pip
    iproute2 ethtool kmod iputils-ping tcpdump
    openvswitch-switch                   # ovsdb-server and ovs-vswitchd for tests and demo
    nftables                             # binding tests: masquerade's NAT rules, written as virt-handler does
    qperf iperf3                         # benchmarks
    busybox-static cpio gcc libc6-dev git
)
if [ "${TCBYPASS_SETUP:-all}" != node ]; then
    packages+=(
        qemu-system-x86 qemu-utils       # VM tests: a real guest on the tap (gcc: the static UDP tool it carries)
        mmdebstrap e2fsprogs             # kernel matrix and Vagrant box: images from Debian's packages
        vagrant vagrant-libvirt          # Vagrant: the local box on libvirt ...
        libvirt-daemon-system libvirt-clients dnsmasq-base rsync   # ... which the lab starts itself
        skopeo                           # scripts/build-image.sh: the agent's image from Debian packages
        podman runc                      # tests/image: run the DaemonSet's pod (runc: crun fails on hybrid cgroups)
    )
fi
kver=$(uname -r)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
headers_pkg=""
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-cache show "linux-headers-$kver" >/dev/null 2>&1; }; then
        headers_pkg="linux-headers-$kver"
    else
        headers_pkg="linux-headers-amd64"
        [ "$(dpkg --print-architecture)" = arm64 ] && headers_pkg="linux-headers-arm64"
    fi
    dpkg-query -W -f='${Status}' "$headers_pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$headers_pkg")
fi
# passt for the binding tests (a real passt in the passt pod); older releases lack the package.
if [ "${TCBYPASS_SETUP:-all}" != node ]; then
    if apt-cache show passt >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-cache show passt >/dev/null 2>&1; }; then
        dpkg-query -W -f='${Status}' passt 2>/dev/null | grep -q 'install ok installed' || missing+=(passt)
    else
        say "no passt package here: the passt binding test will fail until passt is installed"
    fi
fi
# The guest kernel for the VM tests (any distribution kernel with virtio_net).
ls /boot/vmlinuz-* >/dev/null 2>&1 || missing+=(linux-image-amd64)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc needs the running kernel's headers under /lib/modules/$kver. When the
# distribution has none for this kernel, wire in the nearest ones it has.
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    shopt -s nullglob
    arch_dirs=(/usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64)
    common_dirs=(/usr/src/linux-headers-*-common)
    shopt -u nullglob
    arch_dir=$(printf '%s\n' "${arch_dirs[@]}" | sort -V | tail -1)
    common_dir=$(printf '%s\n' "${common_dirs[@]}" | sort -V | tail -1)
    [ -n "$arch_dir" ] || { echo "setup: no kernel headers found under /usr/src" >&2; exit 1; }
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$arch_dir" "/lib/modules/$kver/build"
    ln -sfn "${common_dir:-$arch_dir}" "/lib/modules/$kver/source"
    say "NOTE: no headers for kernel $kver in the distribution; using $(basename "$arch_dir") instead"
    say "      (/lib/modules/$kver/build -> $arch_dir, source -> ${common_dir:-$arch_dir})."
    say "      tc programs only use stable UAPI headers, so this is safe for tcbypass."
else
    say "kernel headers for $kver: $(readlink -f /lib/modules/$kver/build)"
fi

if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
    say "mounted bpffs on /sys/fs/bpf"
fi

# Debian's own interpreter sees python3-bpfcc; another python3 first on PATH may not.
py=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv (with system site-packages, for bcc)"
    "$py" -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# Two distributions from this checkout: the node tool (what a node's image holds) and its lab.
# (TCBYPASS_SETUP=node: the lab without its plotting extra.)
lab_extra="[bench]"
[ "${TCBYPASS_SETUP:-all}" = node ] && lab_extra=""
"$venv/bin/python" -m pip install -q -e "$here[test]" -e "$here/lab$lab_extra"
"$venv/bin/python" -c 'import bcc' || { echo "setup: the venv does not see bcc" >&2; exit 1; }
say "ready: $venv/bin/tcbypass ($("$venv/bin/tcbypass" --version)), $venv/bin/tcbypass-lab"
