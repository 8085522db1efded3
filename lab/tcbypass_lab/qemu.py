"""What every qemu guest of the lab shares: the emulator, its machine flags, its errors."""

from __future__ import annotations

from tcbypass.errors import TcbError

QEMU = "qemu-system-x86_64"


class GuestError(TcbError):
    """qemu, the guest or the pod's DHCP server failed or did not answer in time."""


class GuestTimeout(GuestError):
    """A guest command or the boot overran its time limit."""


def machine_args(memory: int, cpus: int = 1) -> list[str]:
    """-nodefaults: no default NIC (no user-mode network), no monitor, no VGA.
    The first serial port goes to stdio un-multiplexed, so every byte we
    write reaches the guest (with -nographic, qemu would watch for Ctrl-A)."""
    return ["-m", str(memory), "-smp", str(cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot"]
