"""Where tcbypass keeps its node-local state outside bpffs.

RUN_DIR holds what must outlive one process but not a reboot: attachment
locks, the markers of clsact qdiscs tcbypass added, and the kernel probe's
answer for this boot. Every tcbypass on a node (node hooks, the CLI, the
agent) must share it: a container mounts the node's own. Only emulated
nodes point it elsewhere ($TCBYPASS_RUN_DIR), so that two emulated nodes on
one machine, or a test's emulated reboot, keep their state apart.
"""

from __future__ import annotations

import os

RUN_DIR = os.environ.get("TCBYPASS_RUN_DIR", "/run/tcbypass")
