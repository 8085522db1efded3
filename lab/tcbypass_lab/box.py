"""A Vagrant box built here, from Debian's packages, for vagrant/Vagrantfile.

No box can be downloaded on the machines this project is built on (nor on an
air-gapped CI or an operator's offline lab), so the box is made the way the
kernel matrix makes its images (kernel_image.py: mmdebstrap, then an ext4
image; the same builder and cache, another recipe): Debian 12 with systemd,
sshd, the `vagrant` user with Vagrant's well-known insecure key (taken from
the Vagrant installed here) and passwordless sudo, DHCP on eth0, the virtio
drivers in its initramfs, and what the project's setup installs, with the
Python wheels in /opt/tcbypass/wheels so that provisioning needs no network.

A libvirt box is a tar of metadata.json, a Vagrantfile and a qcow2 box.img.
This one boots its kernel directly (libvirt's direct kernel boot): its
Vagrantfile points libvirt at the kernel and initrd, which live where
libvirt's QEMU may read them (/var/lib/libvirt/boot). The box is rebuilt only
when its recipe changes, and added to Vagrant under BOX_NAME.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tcbypass.errors import TcbError

from .kernel_image import (DEFAULT_CACHE_DIR, GUEST_PACKAGES, ImageRecipe, KernelTarget, ensure_image,
                           requirements_from_pyproject)

log = logging.getLogger(__name__)

BOX_NAME = "tcbypass/debian12"
REPO = Path(__file__).resolve().parents[2]
BOOT_DIR = "/var/lib/libvirt/boot"  # where libvirt's QEMU (libvirt-qemu) may read kernels
WHEELHOUSE = "/opt/tcbypass/wheels"
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet"

# A Vagrant box: a real init, ssh, sudo, rsync for the synced folder, DHCP.
BOX_PACKAGES = ("systemd-sysv", "udev", "dbus", "openssh-server", "sudo", "rsync", "ca-certificates", "less")
# What scripts/setup.sh installs for the node tool and the test layers the Vagrant selection runs
# (TCBYPASS_SETUP=node), so that provisioning finds it all in place.
NODE_PACKAGES = ("python3-bpfcc", "bpfcc-tools", "libbpf1", "python3-venv", "python3-pip", "iproute2", "ethtool",
                 "kmod", "iputils-ping", "tcpdump", "openvswitch-switch", "nftables", "qperf", "iperf3",
                 "busybox-static", "cpio", "gcc", "libc6-dev", "git")
# The build backend of `pip install -e .` and what it needs, for offline provisioning.
BUILD_REQUIREMENTS = ("hatchling>=1.18", "editables", "packaging", "pathspec", "pluggy", "trove-classifiers")

NETWORK = "[Match]\nName=eth*\n\n[Network]\nDHCP=yes\n"


class BoxError(TcbError):
    """The box could not be built or added."""


def vagrant_key() -> str:
    """Vagrant's well-known insecure public key, from the Vagrant installed here."""
    found = sorted(glob.glob("/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub")
                   + glob.glob("/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub"))
    if not found:
        raise BoxError("cannot find Vagrant's insecure key (keys/vagrant.pub of the vagrant gem)",
                       hint="install vagrant (scripts/setup.sh does)")
    return Path(found[-1]).read_text().strip()


def recipe(repo: Path = REPO) -> ImageRecipe:
    """The box as an image recipe of the kernel matrix's builder."""
    target = KernelTarget("box-debian12", "bookworm",
                          ("deb http://deb.debian.org/debian bookworm main",
                           "deb http://deb.debian.org/debian-security bookworm-security main"), "3.11",
                          note="the Vagrant box: Debian 12 with its kernel")
    key = vagrant_key()
    hooks = (
        'chroot "$1" useradd -m -s /bin/bash vagrant',
        'mkdir -p "$1/home/vagrant/.ssh"',
        f'printf "%s\\n" {_sq(key)} > "$1/home/vagrant/.ssh/authorized_keys"',
        'chmod 700 "$1/home/vagrant/.ssh" && chmod 600 "$1/home/vagrant/.ssh/authorized_keys"',
        'chroot "$1" chown -R vagrant:vagrant /home/vagrant/.ssh',
        'printf "vagrant ALL=(ALL) NOPASSWD:ALL\\n" > "$1/etc/sudoers.d/vagrant" && '
        'chmod 440 "$1/etc/sudoers.d/vagrant"',
        f'printf %s {_sq(NETWORK)} > "$1/etc/systemd/network/eth.network"',
        'chroot "$1" systemctl enable systemd-networkd ssh',
        'printf "/dev/vda / ext4 defaults 0 1\\n" > "$1/etc/fstab"',
        'echo tcbypass-box > "$1/etc/hostname"',
        'mkdir -p "$1/etc/ssh/sshd_config.d" && printf "UseDNS no\\n" > "$1/etc/ssh/sshd_config.d/vagrant.conf"',
    )
    reqs = requirements_from_pyproject((repo / "pyproject.toml").read_text()) + BUILD_REQUIREMENTS
    return ImageRecipe(target, GUEST_PACKAGES + BOX_PACKAGES + NODE_PACKAGES, reqs, customize=hooks,
                       wheelhouse=WHEELHOUSE, free_bytes=3 << 30)


def _sq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@dataclass(frozen=True)
class Box:
    path: Path  # the .box file
    key: str  # the recipe's key: which build it is
    kernel: str  # where libvirt boots its kernel from
    initrd: str
    built_seconds: float  # 0.0 when the cache had it


def box_vagrantfile(kernel: str, initrd: str) -> str:
    return f'''# The box's own settings (tcbypass-lab box): libvirt boots its kernel directly.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = "{kernel}"
    lv.initrd = "{initrd}"
    lv.cmd_line = "{CMDLINE}"
    lv.disk_bus = "virtio"
  end
end
'''


def build(cache_dir: str = DEFAULT_CACHE_DIR, rebuild: bool = False) -> Box:
    """The box file, built (or taken from the cache) from `recipe()`."""
    for tool, package in (("qemu-img", "qemu-utils"), ("mmdebstrap", "mmdebstrap"), ("vagrant", "vagrant")):
        if shutil.which(tool) is None:
            raise BoxError(f"{tool} is not installed", hint=f"apt-get install {package} (scripts/setup.sh does)")
    r = recipe()
    image, seconds = ensure_image(r, cache_dir, rebuild=rebuild)
    key = r.key()
    box = image.path / f"tcbypass-{key}.box"
    kernel, initrd = f"{BOOT_DIR}/tcbypass-box-{key}-vmlinuz", f"{BOOT_DIR}/tcbypass-box-{key}-initrd.img"
    os.makedirs(BOOT_DIR, exist_ok=True)
    for src, dest in ((image.vmlinuz, kernel), (image.initrd, initrd)):
        if not os.path.exists(dest):
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o644)
    if not box.exists() or rebuild:
        with tempfile.TemporaryDirectory(dir=image.path) as tmp:
            qcow = Path(tmp) / "box.img"
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image.rootfs), str(qcow)], check=True,
                           capture_output=True, timeout=900)
            size_gb = -(-image.rootfs.stat().st_size // (1 << 30))
            (Path(tmp) / "metadata.json").write_text(json.dumps({"provider": "libvirt", "format": "qcow2",
                                                                 "virtual_size": size_gb}))
            (Path(tmp) / "Vagrantfile").write_text(box_vagrantfile(kernel, initrd))
            (Path(tmp) / "tcbypass-box-key").write_text(key + "\n")
            partial = box.with_suffix(".partial")
            with tarfile.open(partial, "w") as tar:
                for name in ("metadata.json", "Vagrantfile", "tcbypass-box-key", "box.img"):
                    tar.add(Path(tmp) / name, arcname=name)
            os.replace(partial, box)
    return Box(box, key, kernel, initrd, seconds)


def _vagrant(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["vagrant", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"})


def added_key(name: str = BOX_NAME) -> str | None:
    """The recipe key of the box Vagrant has under `name`, or None."""
    home = Path(os.environ.get("VAGRANT_HOME", Path.home() / ".vagrant.d"))
    for marker in (home / "boxes" / name.replace("/", "-VAGRANTSLASH-")).glob("*/libvirt/tcbypass-box-key"):
        return marker.read_text().strip()
    return None


def ensure_added(cache_dir: str = DEFAULT_CACHE_DIR, rebuild: bool = False) -> Box:
    """Build the box if needed and have Vagrant hold this very build under BOX_NAME (an older
    build is replaced, and its base volume in libvirt's pool with it)."""
    box = build(cache_dir, rebuild)
    if added_key() == box.key and not rebuild:
        return box
    remove_base_volumes()
    proc = _vagrant("box", "add", "--force", "--name", BOX_NAME, str(box.path))
    if proc.returncode != 0:
        raise BoxError(f"vagrant box add failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    log.info("added %s to Vagrant as %s", box.path, BOX_NAME)
    return box


def remove_base_volumes(pool: str = "default") -> list[str]:
    """Delete the box's base images vagrant-libvirt uploaded to libvirt's pool (they
    outlive `vagrant destroy`, and a rebuilt box must not start from a stale one)."""
    prefix = BOX_NAME.replace("/", "-VAGRANTSLASH-")
    listing = subprocess.run(["virsh", "-c", "qemu:///system", "vol-list", pool], capture_output=True, text=True,
                             timeout=60)
    removed = []
    for line in listing.stdout.splitlines()[2:]:
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            subprocess.run(["virsh", "-c", "qemu:///system", "vol-delete", name, "--pool", pool],
                           capture_output=True, timeout=60)
            removed.append(name)
    return removed
