#!/bin/sh
# Build the Vagrant box tcbypass/debian12 from Debian's packages and add it to Vagrant
# (cached under /var/cache/tcbypass/kernels; seconds when nothing changed). Needs root,
# and scripts/setup.sh run once. `vagrant up` in vagrant/ calls the same thing itself.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$here/.venv/bin/tcbypass-lab" ]; then
    echo "error: no .venv here; run scripts/setup.sh first" >&2
    exit 1
fi
exec "$here/.venv/bin/tcbypass-lab" box "$@"
