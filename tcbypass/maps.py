"""The program's maps as Python sees them: the enums and structs shared with
bpf/redirect.c (declared there once, mirrored here once) and typed access to
one attachment's pinned maps.

tcb_config  0               -> struct tcb_config: MACs, flags, the two ifindexes
tcb_tap     0               -> the tap's ifindex (a devmap: emptied by the kernel when the tap goes)
tcb_stats   0               -> struct tcb_counters, per CPU
tcb_meta    0               -> the attachment record (JSON), made here, not in C
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
from dataclasses import dataclass, field

from . import bpfsys
from .errors import BpfError, InputError


class Direction(enum.IntEnum):
    """enum tcb_dir."""

    FROM_VM = 0  # tap ingress -> NIC egress
    TO_VM = 1  # NIC ingress -> tap egress


class Reason(enum.IntEnum):
    """enum tcb_reason: why a frame was left to the bridge."""

    UNKNOWN_DEV = 0
    RUNT = 1
    MULTICAST = 2
    FOREIGN_MAC = 3
    LOCAL = 4
    ETHERTYPE = 5
    DHCP = 6
    NO_TARGET = 7


# tcb_config.flags
F_DHCP_TO_BRIDGE = 0x1  # leave DHCPv4 to the in-pod server
F_PEER = 0x2  # from the VM by bpf_redirect_peer(): frames for the host side's own MAC
F_PEER_ALL = 0x4  # ... every frame (the host side is a switch port)
F_KERNEL_TYPES = 0x8  # the kernel makes peer-redirected frames PACKET_HOST itself (6.15+, and stable kernels with the fix)
# The path's MTU rides in the flags' upper 12 bits, in units of 4 bytes (up to 16380; 0: no limit).
MTU_SHIFT, MTU_UNIT = 4, 4
MTU_MAX = ((1 << 12) - 1) * MTU_UNIT


def mtu_flags(mtu: int) -> int:
    """The flags' bits that carry `mtu` (rounded down to its unit, so never above it)."""
    return (min(mtu, MTU_MAX) // MTU_UNIT) << MTU_SHIFT if mtu > 0 else 0
TYPE_BY_KERNEL = 0xFF  # TCB_TEST: the packet type was left to the kernel

# TC verdicts (uapi/linux/pkt_cls.h) the program may return, as the u32
# BPF_PROG_TEST_RUN reports: "continue" (TCX_NEXT on tcx) and redirect.
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1
TC_ACT_REDIRECT = 7

# Packet types (uapi/linux/if_packet.h).
PACKET_HOST, PACKET_OTHERHOST = 0, 3

# Pin and map names (bpffs names may not contain a dot).
CONFIG, TAP, STATS, META = "tcb_config", "tcb_tap", "tcb_stats", "tcb_meta"
TEST_OUT = "tcb_test_out"  # TCB_TEST builds only
PROG_FROM_VM, PROG_TO_VM = "tcb_from_vm", "tcb_to_vm"
META_SIZE = 4096
PIN_LAYOUT = "v2"  # the pin layout's version, in every pin path (loader.PIN_ROOT): bump it when a map's layout changes


class ConfigEntry(ctypes.Structure):
    """struct tcb_config."""

    _fields_ = [
        ("vm_mac", ctypes.c_uint8 * 6),
        ("bridge_mac", ctypes.c_uint8 * 6),
        ("host_mac", ctypes.c_uint8 * 6),
        ("flags", ctypes.c_uint16),
        ("tap_ifindex", ctypes.c_uint32),
        ("nic_ifindex", ctypes.c_uint32),
    ]


class CountersEntry(ctypes.Structure):
    """struct tcb_counters (one CPU's share)."""

    _fields_ = [
        ("redirect_packets", ctypes.c_uint64 * len(Direction)),
        ("redirect_bytes", ctypes.c_uint64 * len(Direction)),
        ("pass_packets", ctypes.c_uint64 * len(Reason)),
    ]


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes. Unicast only: a VM's own MAC is never a group address."""
    parts = text.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise InputError(f"malformed MAC address {text!r}", hint="write it as six hex pairs, e.g. 52:54:00:12:34:56")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise InputError(f"malformed MAC address {text!r}", hint="write it as six hex pairs, e.g. 52:54:00:12:34:56") from None
    if raw[0] & 1:
        raise InputError(f"{text} is a multicast MAC address", hint="give the VM's unicast MAC")
    if raw == bytes(6):
        raise InputError("00:00:00:00:00:00 is not a usable MAC address", hint="give the VM's MAC")
    return raw


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def config_entry(vm_mac: bytes, bridge_mac: bytes, host_mac: bytes, flags: int,
                 tap_ifindex: int, nic_ifindex: int) -> ConfigEntry:
    entry = ConfigEntry(flags=flags, tap_ifindex=tap_ifindex, nic_ifindex=nic_ifindex)
    ctypes.memmove(entry.vm_mac, vm_mac, 6)
    ctypes.memmove(entry.bridge_mac, bridge_mac, 6)
    ctypes.memmove(entry.host_mac, host_mac, 6)
    return entry


@dataclass(frozen=True)
class Counters:
    """Counters of one attachment, summed over CPUs."""

    redirect_packets: dict = field(default_factory=dict)  # Direction name -> int
    redirect_bytes: dict = field(default_factory=dict)
    passed: dict = field(default_factory=dict)  # Reason name -> int

    @classmethod
    def zero(cls) -> "Counters":
        return cls({d.name.lower(): 0 for d in Direction}, {d.name.lower(): 0 for d in Direction},
                   {r.name.lower(): 0 for r in Reason})

    def to_json(self) -> dict:
        return {
            "redirected_packets": dict(self.redirect_packets),
            "redirected_bytes": dict(self.redirect_bytes),
            "passed_packets": dict(self.passed),
        }


def sum_counters(per_cpu: list[CountersEntry]) -> Counters:
    return Counters(
        {d.name.lower(): sum(c.redirect_packets[d] for c in per_cpu) for d in Direction},
        {d.name.lower(): sum(c.redirect_bytes[d] for c in per_cpu) for d in Direction},
        {r.name.lower(): sum(c.pass_packets[r] for c in per_cpu) for r in Reason},
    )


BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_DEVMAP = 2, 6, 14


def expected_layout() -> dict[str, tuple[int, int, int]]:
    """(type, key size, value size) of each map of this build, from the structs above."""
    return {
        CONFIG: (BPF_MAP_TYPE_ARRAY, 4, ctypes.sizeof(ConfigEntry)),
        TAP: (BPF_MAP_TYPE_DEVMAP, 4, 4),
        STATS: (BPF_MAP_TYPE_PERCPU_ARRAY, 4, ctypes.sizeof(CountersEntry)),
        META: (BPF_MAP_TYPE_ARRAY, 4, META_SIZE),
    }


class AttachmentMaps:
    """Open fds of one attachment's pinned maps; use as a context manager.

    Every map is checked against this build's layout before use: a pin of
    another version or tool with other value sizes would otherwise make the
    kernel write past our buffers."""

    def __init__(self, pin_dir: str, readonly: bool = False, only: tuple[str, ...] = ()):
        self.pin_dir = pin_dir
        self.readonly = readonly
        self.only = only  # open just these maps (the record alone is readable in any layout's pins)
        self._fds: dict[str, int] = {}

    def __enter__(self) -> "AttachmentMaps":
        try:
            for name, layout in expected_layout().items():
                if self.only and name not in self.only:
                    continue
                fd = bpfsys.obj_get(f"{self.pin_dir}/{name}", readonly=self.readonly)
                self._fds[name] = fd
                info = bpfsys.map_info(fd)
                if (info.type, info.key_size, info.value_size) != layout:
                    raise BpfError(f"{self.pin_dir}/{name} is not a tcbypass {PIN_LAYOUT} map "
                                   f"(type {info.type}, key {info.key_size} B, value {info.value_size} B)",
                                   hint="pins of another version or tool; 'tcbypass gc' removes them")
        except OSError as exc:
            self.close()
            raise BpfError(f"cannot open the pinned maps in {self.pin_dir} ({exc.strerror})",
                           hint="run 'tcbypass gc' to clear a broken attachment, then attach again") from exc
        except BpfError:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # --- tcb_config ----------------------------------------------------
    def set_config(self, entry: ConfigEntry) -> None:
        try:
            bpfsys.map_update(self._fds[CONFIG], ctypes.c_uint32(0), entry)
        except OSError as exc:
            raise BpfError(f"cannot write {CONFIG} ({exc.strerror})",
                           hint="run 'tcbypass gc' and attach again") from exc

    def config(self) -> ConfigEntry:
        entry = ConfigEntry()
        bpfsys.map_lookup(self._fds[CONFIG], ctypes.c_uint32(0), entry)
        return entry

    # --- tcb_tap (a devmap) ---------------------------------------------
    def set_tap(self, ifindex: int) -> None:
        """Point the to-VM direction at the tap `ifindex`. The kernel resolves
        the ifindex in the calling thread's network namespace: call this from
        inside the pod (netns.run_in)."""
        try:
            bpfsys.map_update(self._fds[TAP], ctypes.c_uint32(0), ctypes.c_uint32(ifindex))
        except OSError as exc:
            raise BpfError(f"cannot point the fast path at the tap (ifindex {ifindex}) ({exc.strerror})",
                           hint="the tap vanished while attaching; attach again") from exc

    def tap(self) -> int | None:
        """The tap's ifindex, or None once the kernel emptied the slot (the tap went)."""
        value = ctypes.c_uint32()
        return value.value if bpfsys.map_lookup(self._fds[TAP], ctypes.c_uint32(0), value) else None

    # --- tcb_stats -------------------------------------------------------
    def counters(self) -> Counters:
        ncpu = bpfsys.possible_cpus()
        values = (CountersEntry * ncpu)()
        if not bpfsys.map_lookup(self._fds[STATS], ctypes.c_uint32(0), values):
            return Counters.zero()
        return sum_counters(list(values))

    # --- tcb_meta --------------------------------------------------------
    def write_record(self, record: dict) -> None:
        blob = json.dumps(record, sort_keys=True).encode()
        if len(blob) > META_SIZE - 4:
            raise BpfError(f"attachment record too large ({len(blob)} bytes)", hint="use shorter names")
        buf = (ctypes.c_uint8 * META_SIZE)()
        ctypes.memmove(buf, len(blob).to_bytes(4, "little") + blob, len(blob) + 4)
        bpfsys.map_update(self._fds[META], ctypes.c_uint32(0), buf)

    def read_record(self) -> dict | None:
        buf = (ctypes.c_uint8 * META_SIZE)()
        if not bpfsys.map_lookup(self._fds[META], ctypes.c_uint32(0), buf):
            return None
        raw = bytes(buf)
        size = int.from_bytes(raw[:4], "little")
        if not 0 < size <= META_SIZE - 4:
            return None
        try:
            return json.loads(raw[4:4 + size])
        except ValueError:
            return None
