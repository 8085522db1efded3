"""Our tcx hook on a device (kernel 6.6+): a BPF link on the device's ingress.

A tcx link needs no qdisc: creating or removing one never grafts anything,
so the device's queues are never stopped and no frame is lost (a clsact
graft drops what is in flight, see tc.py). tcx also runs programs more
cheaply than cls_bpf, and before any clsact filter.

Our link is appended behind the tcx programs already on the device, so
they keep seeing every frame. Frames we leave to the bridge return
TCX_NEXT, so programs after ours and clsact filters still see them.

A link lives as long as something holds it: we pin it in the attachment's
bpffs directory (link_from_vm, link_to_vm), so it outlives the process that
made it. When its device is deleted the link stays, defunct (ifindex 0),
until it is unpinned; status reports that and gc removes it. The program
of a live link is swapped in place with BPF_LINK_UPDATE: every frame sees
the old or the new program, never neither.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from . import bpfsys, netns
from .errors import TcError
from .maps import Direction

PINS = {Direction.FROM_VM: "link_from_vm", Direction.TO_VM: "link_to_vm"}


def pin_of(pin_dir: str, direction: Direction) -> str:
    return f"{pin_dir}/{PINS[direction]}"


@dataclass(frozen=True)
class Link:
    """What a pinned link of ours is doing."""

    id: int
    ifindex: int  # 0 once its device is gone
    prog_id: int

    @property
    def defunct(self) -> bool:
        return self.ifindex == 0


def read(pin_dir: str, direction: Direction) -> Link | None:
    """Our pinned link for `direction`, or None when there is none. A link pin
    opens read-write only (the kernel refuses read-only opens of links), so on
    a read-only bpffs this raises OSError (EROFS)."""
    try:
        fd = bpfsys.obj_get(pin_of(pin_dir, direction))
    except FileNotFoundError:
        return None
    try:
        info = bpfsys.link_info(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if info.type != bpfsys.BPF_LINK_TYPE_TCX:
        return None
    return Link(info.id, info.ifindex, info.prog_id)


def ensure(pin_dir: str, direction: Direction, netns_path: str, ifindex: int, prog_fd: int) -> str:
    """Have our link on `ifindex` run `prog_fd`: 'created', 'updated' (program
    swapped in place) or 'unchanged'. A link left on another device (an old
    tap) or a defunct one is taken off first."""
    pin = pin_of(pin_dir, direction)
    try:
        current = read(pin_dir, direction)
    except OSError as exc:
        raise TcError(f"cannot open our tcx link {pin} ({exc.strerror})",
                      hint="bpffs must be writable; 'tcbypass doctor' checks it") from None
    if current is not None and current.ifindex == ifindex:
        if current.prog_id == bpfsys.prog_info(prog_fd).id:
            return "unchanged"
        fd = bpfsys.obj_get(pin)
        try:
            bpfsys.link_update(fd, prog_fd)
        except OSError as exc:
            raise TcError(f"cannot swap the program of our tcx link on ifindex {ifindex} ({exc.strerror})",
                          hint="run 'tcbypass doctor'") from None
        finally:
            os.close(fd)
        return "updated"
    remove(pin_dir, direction)
    try:
        fd = netns.run_in(netns_path, lambda: bpfsys.tcx_link_create(prog_fd, ifindex))
    except OSError as exc:
        raise TcError(f"cannot attach a tcx link to ifindex {ifindex} in {netns_path} ({exc.strerror})",
                      hint="does this kernel have tcx (6.6+)? 'tcbypass doctor' says; "
                           "--hook clsact uses the older hook") from None
    try:
        bpfsys.obj_pin(fd, pin)
    finally:
        os.close(fd)  # the pin holds it now; if pinning failed, closing detaches it
    return "created"


def remove(pin_dir: str, direction: Direction) -> bool:
    """Take our link off its device (whoever else holds it) and unpin it;
    False when there was none."""
    pin = pin_of(pin_dir, direction)
    try:
        fd = bpfsys.obj_get(pin)
    except OSError:
        return False
    try:
        with contextlib.suppress(OSError):  # a defunct link is already off
            bpfsys.link_detach(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin)
    return True


def move(from_dir: str, to_dir: str) -> None:
    """Move our link pins to another attachment directory (a new program
    instance is being put in place); the links stay attached meanwhile."""
    for name in PINS.values():
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{from_dir}/{name}", f"{to_dir}/{name}")


def programs_on(netns_path: str, ifindex: int) -> list[int]:
    """Ids of every tcx program on a device's ingress, in running order (ours and others')."""
    try:
        return netns.run_in(netns_path, lambda: bpfsys.tcx_programs(ifindex))
    except OSError:
        return []
