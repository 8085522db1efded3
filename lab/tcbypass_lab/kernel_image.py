"""Bootable Debian guest images for the kernel matrix (see kernels.py).

One image per kernel target: a Debian root filesystem built by mmdebstrap
straight from the package mirror, holding that release's kernel, the
headers of exactly that kernel (so bcc compiles against them), python3 with
bcc, iproute2, Open vSwitch and a venv with the project's Python
dependencies. It is written into a raw ext4 file with `mkfs.ext4 -d` (no
loop mount, no privileges beyond root), and the kernel and the small
initramfs that Debian's initramfs-tools made inside it are copied out next
to it, so qemu boots them directly with the root on virtio-blk.

pip inside the chroot would not see this machine's pip configuration (its
index and certificate), so the wheels are downloaded on the host for the
guest's Python version and installed offline in the image.

Cache. An image lives in `<cache>/<target>-<key>/` where the key hashes
everything that went into it (`ImageRecipe`): the target's apt sources and
packages, the Python requirements, the guest's init script and a format
number. A directory appears there only when complete (built under a
temporary name, then renamed), and a lock file per target keeps two
builders apart. Runs boot it with a throwaway copy-on-write overlay, so the
cached file is never written. What the mirror served (kernel version,
package versions) is recorded in `manifest.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tcbypass.errors import TcbError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/tcbypass/kernels"
IMAGE_FORMAT = 1  # bump when the layout of an image changes
GUEST_VENV = "/opt/tcbypass/venv"
GUEST_INIT = "/usr/local/sbin/tcb-matrix-init"
SHARE_TAG = "tcbshare"  # the 9p mount tag of a run's directory
SHARE_MOUNT = "/mnt/tcb"

# Markers the guest prints on its console (kernels.py reads them).
BOOTED_MARKER = "TCB-MATRIX-BOOTED"
EXIT_MARKER = "TCB-MATRIX-EXIT"

# What every guest gets besides its kernel and headers.
GUEST_PACKAGES = (
    "python3", "python3-bpfcc", "python3-venv", "python3-pip",  # bcc and the venv for our deps
    "iproute2", "ethtool", "iputils-ping", "procps", "kmod", "util-linux", "mount",  # what the tests call
    "openvswitch-switch",
    "initramfs-tools", "zstd",  # the initramfs we boot (zstd so it is compressed as Debian does)
)

# Not needed in a test guest; keeping them out saves a quarter of the image.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")

# PID 1 of the guest, reached through Debian's initramfs (init=...). It
# mounts what the tests need, runs the run directory's job.sh (shared over
# 9p) with the console as its output, and powers off. The job decides what
# runs, so changing the test selection never rebuilds an image.
INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of a tcbypass kernel-matrix guest (built by lab/tcbypass_lab/kernel_image.py).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
mnt() { mountpoint -q "$3" || { mkdir -p "$3"; mount -t "$1" "$2" "$3"; }; }
mnt proc proc /proc
mnt sysfs sysfs /sys
mnt devtmpfs devtmpfs /dev
mnt devpts devpts /dev/pts
mnt tmpfs tmpfs /dev/shm
mnt tmpfs tmpfs /run
mnt tmpfs tmpfs /tmp
mnt bpf bpf /sys/fs/bpf
mnt cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /run/netns /var/run
[ -L /var/run ] || mnt tmpfs tmpfs /var/run
hostname tcb-guest
ip link set lo up
say() { echo "$*" >/dev/ttyS0; }
modprobe -a 9pnet_virtio 9p 2>/dev/null
mkdir -p __SHARE__
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 __TAG__ __SHARE__; then
    say "__BOOTED__ $(uname -r)"
    sh __SHARE__/job.sh </dev/null >/dev/ttyS0 2>&1
    rc=$?
else
    rc=125
fi
say "__EXIT__ $rc"
sync
echo o >/proc/sysrq-trigger
sleep 10
""".replace("__SHARE__", SHARE_MOUNT).replace("__TAG__", SHARE_TAG) \
   .replace("__BOOTED__", BOOTED_MARKER).replace("__EXIT__", EXIT_MARKER)

CLI_SHIM = f"""#!/bin/sh
exec {GUEST_VENV}/bin/python -m tcbypass "$@"
"""

# initramfs-tools: only what finds and mounts a virtio-blk root, so the
# initramfs stays small and boots fast under TCG.
INITRAMFS_CONF = "MODULES=list\n"
INITRAMFS_HOOK = """#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk ext4; do force_load "$m"; done
"""


class ImageError(TcbError):
    """Building, finding or checking a guest image failed."""


@dataclass(frozen=True)
class KernelTarget:
    """A kernel the matrix runs on: a Debian release and where its packages come from."""

    name: str  # "6.1"
    suite: str  # the release mmdebstrap bootstraps
    sources: tuple[str, ...]  # apt source lines
    python: str  # the release's python3, for the wheels: "3.11"
    kernel_packages: tuple[str, ...] = ("linux-image-amd64", "linux-headers-amd64")
    note: str = ""


@dataclass(frozen=True)
class ImageRecipe:
    """Everything that goes into one image; its hash names the cache entry."""

    target: KernelTarget
    packages: tuple[str, ...]
    requirements: tuple[str, ...]
    init_script: str = INIT_SCRIPT
    cli_shim: str = CLI_SHIM
    initramfs: tuple[str, str] = (INITRAMFS_CONF, INITRAMFS_HOOK)
    excludes: tuple[str, ...] = DPKG_EXCLUDES
    format: int = IMAGE_FORMAT
    customize: tuple[str, ...] = ()  # more mmdebstrap customize hooks, run after ours ($1 is the root)
    wheelhouse: str = ""  # also keep the wheels in the image here (offline pip installs)
    free_bytes: int = 1 << 30  # room left in the filesystem for what runs in it

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.target.name}-{self.key()}"


@dataclass(frozen=True)
class Image:
    """A built image in the cache."""

    path: Path
    kernel_version: str
    manifest: dict

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.img"

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"


# --- pure helpers ------------------------------------------------------------

def requirements_from_pyproject(text: str, extras: tuple[str, ...] = ("test",)) -> tuple[str, ...]:
    """The project's runtime dependencies plus those of `extras`, from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(text)["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return tuple(reqs)


# Dependencies that pip only pulls in for older Pythons (environment markers
# are judged against the host's Python, not the target's), so ask for them
# outright. Harmless on a Python that does not need them.
BACKPORTS = ("exceptiongroup", "tomli", "typing_extensions")


def pip_download_argv(python: str, requirements: tuple[str, ...], dest: str) -> list[str]:
    """pip download of binary wheels for a guest whose python3 is `python` ("3.9")."""
    return [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", dest,
            "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *[arg for plat in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                               "linux_x86_64", "any") for arg in ("--platform", plat)],
            *requirements, *BACKPORTS]


def mmdebstrap_argv(recipe: ImageRecipe, rootfs: str, wheels: str, init_file: str, shim_file: str) -> list[str]:
    """The mmdebstrap command that builds `recipe` into the directory `rootfs`."""
    t = recipe.target
    reqs = " ".join(f"'{r}'" for r in recipe.requirements)
    conf, hook = recipe.initramfs
    setup = (f'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks" && '
             f'printf %s {_sq(conf)} > "$1/etc/initramfs-tools/conf.d/tcb-matrix" && '
             f'printf %s {_sq(hook)} > "$1/etc/initramfs-tools/hooks/tcb-matrix" && '
             f'chmod 755 "$1/etc/initramfs-tools/hooks/tcb-matrix"')
    customize = [
        f"copy-in {wheels} /tmp",
        f'chroot "$1" python3 -m venv --system-site-packages {GUEST_VENV}',
        f'chroot "$1" {GUEST_VENV}/bin/pip install -q --no-index --find-links /tmp/{os.path.basename(wheels)} '
        f'{reqs}',
        f'rm -rf "$1/tmp/{os.path.basename(wheels)}"',
        f"upload {init_file} {GUEST_INIT}",
        f'chmod 755 "$1{GUEST_INIT}"',
        # `tcbypass` on PATH runs the checkout that the job puts on PYTHONPATH.
        f"upload {shim_file} /usr/local/bin/tcbypass",
        'chmod 755 "$1/usr/local/bin/tcbypass"',
        *([f'mkdir -p "$1{recipe.wheelhouse}"', f"sync-in {wheels} {recipe.wheelhouse}"] if recipe.wheelhouse else []),
        *recipe.customize,
        'chroot "$1" dpkg-query -W -f "\\${Package} \\${Version}\\n" > "$1/tcb-packages.txt"',
        f'chroot "$1" {GUEST_VENV}/bin/pip freeze --exclude-editable > "$1/tcb-wheels.txt"',
    ]
    argv = ["mmdebstrap", "--mode=root", "--variant=apt", "--aptopt=APT::Install-Recommends \"false\"",
            *[f"--dpkgopt=path-exclude={p}" for p in recipe.excludes],
            f"--include={','.join([*t.kernel_packages, *recipe.packages])}",
            f"--setup-hook={setup}"]
    argv += [f"--customize-hook={h}" for h in customize]
    return argv + [t.suite, rootfs, *t.sources]


def _sq(text: str) -> str:
    """`text` as one single-quoted shell word."""
    return "'" + text.replace("'", "'\\''") + "'"


def image_size_bytes(used_bytes: int, free_bytes: int = 1 << 30) -> int:
    """Room for the tree plus free space the tests write into (through the overlay)."""
    return (used_bytes * 5 // 4 + free_bytes + (1 << 20) - 1) // (1 << 20) * (1 << 20)


def kernel_version_of(modules_dirs: list[str]) -> str:
    """The one kernel version a rootfs holds, from the names under /lib/modules."""
    versions = sorted(d for d in modules_dirs if re.match(r"\d+\.\d+", d))
    if len(versions) != 1:
        raise ImageError(f"expected one kernel in the image, found {versions or 'none'}")
    return versions[0]


# Another checkout on the same machine (a branch with other requirements) may
# still boot an older entry of the same target: entries go only after a day unused.
UNUSED_FOR_S = 24 * 3600


def superseded(recipe: ImageRecipe, last_used: dict[str, float], now: float) -> list[str]:
    """Cache entries of the same target built from another recipe and unused for
    UNUSED_FOR_S, given each entry's last use ("5.10-<key>" is not "5.10-bullseye-<key>")."""
    pattern = re.compile(rf"{re.escape(recipe.target.name)}-[0-9a-f]{{16}}")
    return sorted(n for n, t in last_used.items()
                  if pattern.fullmatch(n) and n != recipe.dirname and now - t > UNUSED_FOR_S)


def _last_used(cache: Path) -> dict[str, float]:
    found = {}
    for entry in cache.iterdir():
        with contextlib.suppress(OSError):
            found[entry.name] = (entry / "last-used").stat().st_mtime
    return found


# --- building ----------------------------------------------------------------

def find_image(recipe: ImageRecipe, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Image | None:
    path = Path(cache_dir) / recipe.dirname
    manifest = path / "manifest.json"
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text())
    return Image(path, data["kernel_version"], data)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_image(recipe: ImageRecipe, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                 rebuild: bool = False, build_log: str | None = None) -> tuple[Image, float]:
    """The cached image of `recipe`, built first when missing. Returns (image,
    seconds spent building: 0.0 when the cache had it)."""
    cache = Path(cache_dir)
    with _locked(cache / f".{recipe.target.name}.lock"):
        image = find_image(recipe, cache)
        if image and not rebuild:
            (image.path / "last-used").touch()
            return image, 0.0
        # Under the lock no other builder of this target runs: a work directory
        # left here is from a builder that was killed.
        for stale in cache.glob(f".build-{recipe.target.name}-*"):
            if re.fullmatch(rf"\.build-{re.escape(recipe.target.name)}-[^-]+", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        image = _build(recipe, cache, build_log)
        seconds = round(time.monotonic() - started, 1)
        (image.path / "last-used").touch()
        for old in superseded(recipe, _last_used(cache), time.time()):
            shutil.rmtree(cache / old, ignore_errors=True)
        return image, seconds


def _run(argv: list[str], logf, timeout: float, what: str, env: dict | None = None) -> None:
    logf.write(f"$ {' '.join(argv)}\n")
    logf.flush()
    try:
        proc = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what} did not finish within {timeout:.0f} s", hint=f"see {logf.name}") from None
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed", hint="run scripts/setup.sh") from None
    if proc.returncode != 0:
        raise ImageError(f"{what} failed ({proc.returncode})", hint=f"see {logf.name}")


def _build(recipe: ImageRecipe, cache: Path, build_log: str | None) -> Image:
    if os.geteuid() != 0:
        raise ImageError("building a guest image needs root (mmdebstrap --mode=root)")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{recipe.target.name}-", dir=cache))
    log_path = build_log or str(cache / f"{recipe.target.name}.build.log")
    try:
        with open(log_path, "a") as logf:
            wheels = work / "wheels"
            _run(pip_download_argv(recipe.target.python, recipe.requirements, str(wheels)), logf, 600,
                 "downloading the Python wheels")
            init_file, shim_file = work / "init", work / "tcbypass"
            init_file.write_text(recipe.init_script)
            shim_file.write_text(recipe.cli_shim)
            rootfs = work / "rootfs"
            # The host's pip settings (PIP_*) name host paths and indexes: keep them out of the chroot.
            clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
            _run(mmdebstrap_argv(recipe, str(rootfs), str(wheels), str(init_file), str(shim_file)), logf, 1800,
                 f"mmdebstrap {recipe.target.suite}", env=clean_env)
            kver = kernel_version_of(os.listdir(rootfs / "lib" / "modules"))
            out = work / "image"
            out.mkdir()
            shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
            shutil.copyfile(rootfs / "boot" / f"initrd.img-{kver}", out / "initrd.img")
            packages = dict(line.split(" ", 1) for line in
                            (rootfs / "tcb-packages.txt").read_text().splitlines() if " " in line)
            wheels_in = (rootfs / "tcb-wheels.txt").read_text().split()
            used = int(subprocess.run(["du", "-sb", str(rootfs)], capture_output=True, text=True,
                                      check=True).stdout.split()[0])
            img = out / "rootfs.img"
            with open(img, "wb") as f:
                f.truncate(image_size_bytes(used, recipe.free_bytes))
            _run(["mkfs.ext4", "-q", "-F", "-L", "tcbroot", "-d", str(rootfs), str(img)], logf, 600,
                 "mkfs.ext4 -d")
            os.chmod(img, 0o444)  # runs only ever read it, through an overlay
            manifest = {
                "target": recipe.target.name, "suite": recipe.target.suite, "key": recipe.key(),
                "kernel_version": kver,
                "kernel_package": packages.get(f"linux-image-{kver}", ""),
                "headers_package": packages.get(f"linux-headers-{kver}", ""),
                "bcc": packages.get("python3-bpfcc", ""),
                "python3": packages.get("python3", ""),
                "iproute2": packages.get("iproute2", ""),
                "openvswitch": packages.get("openvswitch-switch", ""),
                "wheels": wheels_in,
                "image_bytes": img.stat().st_size,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(rootfs)
            final = cache / recipe.dirname
            shutil.rmtree(final, ignore_errors=True)
            os.replace(out, final)
            log.info("built guest image %s (kernel %s)", final, kver)
            return Image(final, kver, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
