#!/usr/bin/env bash
# The kernel matrix in one command, on a fresh Debian 12 machine, as root:
#
#   scripts/kernel-matrix.sh                          the default kernels (6.1, 5.10, 5.10-bullseye), all groups
#   scripts/kernel-matrix.sh --kernel 6.1 --selection ci    what CI runs
#   scripts/kernel-matrix.sh --list                   kernels and test groups
#
# It runs scripts/setup.sh (packages, venv), then lab/tcbypass_lab/kernels.py,
# which builds each guest image once (cached under /var/cache/tcbypass/kernels),
# boots it with qemu and runs the tests inside. Arguments go to
# `tcbypass-lab kernels` (see --help). Exit 0 when every group
# passed on every kernel.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh" >&2
exec "$here/.venv/bin/tcbypass-lab" kernels "$@"
