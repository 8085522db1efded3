#!/usr/bin/env bash
# Build the node agent's OCI image without any container registry:
#
#   layer 1  Debian bookworm (the Essential set and python3), from the Debian mirror
#   layer 2  the tcbypass wheel and its locked dependency wheels in /usr/local, and
#            the datapath program compiled ahead of time in /var/lib/tcbypass/objects
#
# The image holds no compiler, no bcc and no kernel headers: every node loads the
# prepared build (see `tcbypass prepare`). Run as root, after scripts/setup.sh:
#
#   scripts/build-image.sh                 build; print the name, digests and size
#   scripts/build-image.sh --print-name    only print the name:tag deploy/daemonset.yaml uses
#   scripts/build-image.sh --relock        re-resolve scripts/image-requirements.txt from the index
#
# Output: dist/tcbypass-<version>.oci.tar (an OCI archive), dist/tcbypass-<version>.contents.txt
# (what went in), and the image in the local container storage as localhost/tcbypass:<version>.
#
# Reproducible: the same commit, lock file and Debian mirror state give the same
# digests. Layer 1's timestamps are clamped to the mirror's Release date, layer 2's
# and the image's to SOURCE_DATE_EPOCH (default: the commit's time). Layer 1 is
# cached under .cache/image/ keyed by its recipe and the mirror's Release files, so
# a rebuild after a code change only redoes layer 2 (a few seconds).
#
# Environment: SOURCE_DATE_EPOCH, TCBYPASS_IMAGE (name:tag), DEBIAN_MIRROR,
# DEBIAN_SECURITY_MIRROR (e.g. snapshot.debian.org URLs to rebuild an old image),
# TCBYPASS_IMAGE_CACHE (layer 1's cache directory), NO_CACHE=1 (rebuild layer 1).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
py=/usr/bin/python3  # Debian's: it sees bcc (python3-bpfcc), and its pip installs for Debian's layout
say() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

version=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
          "$here/pyproject.toml")
name=${TCBYPASS_IMAGE:-localhost/tcbypass:$version}
lock="$here/scripts/image-requirements.txt"

case "${1:-}" in
    --print-name) echo "$name"; exit 0 ;;
    --relock|"") ;;
    *) die "unknown option $1 (use --print-name or --relock)" ;;
esac

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap installs packages into a chroot; bcc loads maps to compile)"
for tool in mmdebstrap skopeo podman; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup.sh (it installs mmdebstrap, podman, skopeo)"
done
"$py" -c 'import bcc' 2>/dev/null || die "bcc (python3-bpfcc) is missing: run scripts/setup.sh; the build compiles the program"
"$py" -m pip --version >/dev/null 2>&1 || die "pip for $py is missing: run scripts/setup.sh (python3-pip)"

work=$(mktemp -d /tmp/tcbypass-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
pip_host() {  # with this machine's index configuration (minus its notes about absent local indexes)
    "$py" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

if [ "${1:-}" = --relock ]; then
    # Resolve the project's run-time dependencies from the configured index and pin
    # each one by version and hash. Commit the result: it is an input of the image.
    pip_host wheel -w "$work/all" "$here"
    {
        echo "# The wheels layer 2 of the image installs, pinned by hash (scripts/build-image.sh --relock)."
        for whl in "$work"/all/*.whl; do
            base=$(basename "$whl")
            dist=${base%%-*}
            [ "$dist" = tcbypass ] && continue
            ver=$(echo "$base" | cut -d- -f2)
            echo "${dist//_/-}==$ver --hash=sha256:$(sha256sum "$whl" | cut -d' ' -f1)"
        done | sort -f
    } > "$lock"
    say "wrote $lock"; cat "$lock" >&2
    exit 0
fi

started=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }'; }
: "${SOURCE_DATE_EPOCH:=$(git -C "$here" log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH
revision=$(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$here" status --porcelain --untracked-files=no 2>/dev/null)" ] || revision="$revision-dirty"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://security.debian.org/debian-security}
suite=bookworm
cache=${TCBYPASS_IMAGE_CACHE:-$here/.cache/image}
mkdir -p "$cache" "$here/dist"
exec 9>"$here/dist/.build-image.lock"
flock 9  # one build at a time shares the cache and the image name

# --- layer 1: Debian -------------------------------------------------------------------
# Everything that decides its content goes into its key; the mirror's state enters as
# the hashes of its InRelease files, and their newest Date becomes the layer's epoch.
base_packages=(python3)
mmdebstrap_opts=(
    --variant=essential
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr   # usr-is-merged, not usrmerge (which pulls in perl)
    --include="$(IFS=,; echo "${base_packages[*]}")"
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
    --dpkgopt='path-exclude=/usr/lib/*/gconv/*'   # glibc's iconv converters, 8 MB; Python has its own codecs
    # The runtime provides these three; the host's copies must not end up in the image.
    --customize-hook='rm -f "$1/etc/hostname" "$1/etc/resolv.conf" "$1/etc/hosts"'
    --customize-hook='touch "$1/etc/hostname" "$1/etc/resolv.conf" "$1/etc/hosts"'
    --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" > "$1/../packages.txt"'
    --customize-hook='chroot "$1" python3 -c "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())" > "$1/../pyc-magic"'
)
sources=("deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main")
releases=$("$py" - "$mirror/dists/$suite/InRelease" "$mirror/dists/$suite-updates/InRelease" \
           "$security/dists/$suite-security/InRelease" <<'EOF'
import email.utils, hashlib, sys, urllib.request
dates, digests = [], []
for url in sys.argv[1:]:
    try:
        text = urllib.request.urlopen(url, timeout=30).read()
    except OSError as exc:
        sys.exit(f"build-image: cannot read {url} ({exc}); is the Debian mirror reachable?")
    digests.append(hashlib.sha256(text).hexdigest())
    date = next(l for l in text.decode(errors="replace").splitlines() if l.startswith("Date:"))
    dates.append(int(email.utils.parsedate_to_datetime(date[5:].strip()).timestamp()))
print(max(dates), hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16])
EOF
)
base_epoch=${releases%% *}
base_key=$(printf '%s\n' "$suite" "${sources[@]}" "${mmdebstrap_opts[@]}" "${releases#* }" \
           "$(sha256sum "$here/scripts/oci_image.py")" "$(mmdebstrap --version)" | sha256sum | cut -c1-16)
base="$cache/base-$base_key"
t=$(date +%s.%N)
if [ -z "${NO_CACHE:-}" ] && [ -s "$base/layer.tar.gz.json" ]; then
    say "layer 1: Debian $suite, cached ($base)"
else
    say "layer 1: Debian $suite from $mirror (mirror state of $(date -u -d "@$base_epoch" +%FT%TZ))"
    find "$cache" -mindepth 1 -maxdepth 1 -exec rm -rf {} +  # keep only the current one
    building="$cache/.building-$base_key"
    mkdir -p "$building"
    if ! SOURCE_DATE_EPOCH=$base_epoch mmdebstrap --quiet "${mmdebstrap_opts[@]}" "$suite" "$building/rootfs" \
            "${sources[@]}" >"$work/mmdebstrap.log" 2>&1; then
        grep -E -i -A3 '^E:|error' "$work/mmdebstrap.log" | head -n 40 >&2
        rm -rf "$building"
        die "mmdebstrap failed (above: the end of its log)"
    fi
    "$py" "$here/scripts/oci_image.py" layer --root "$building/rootfs" --mtime "$base_epoch" \
        --out "$building/layer.tar.gz" --created-by "mmdebstrap $suite ${base_packages[*]}" \
        --empty-dir dev --empty-dir proc --empty-dir sys --empty-dir run --empty-dir tmp >/dev/null
    rm -rf "$building/rootfs"
    mv "$building" "$base"
fi
say "layer 1 ready in $(elapsed "$t")"

# --- layer 2: tcbypass ---------------------------------------------------------------
t=$(date +%s.%N)
stage="$work/app"
site="$stage/usr/local/lib/python3.11/dist-packages"
pip_host wheel --no-deps -w "$work/wheels" "$here"                     # the project (hatchling: reproducible)
pip_host wheel --no-deps --require-hashes -r "$lock" -w "$work/wheels"  # the locked dependencies
# Install with Debian's pip for Debian's layout (/usr/local/lib/python3.11/dist-packages),
# from these wheels only; dependencies are resolved against them, so a lock missing one fails.
"$py" -m pip install --isolated --disable-pip-version-check -q --no-index --find-links "$work/wheels" \
    --root "$stage" --no-compile --no-warn-script-location --root-user-action=ignore --break-system-packages \
    "tcbypass==$version"
[ -d "$site/tcbypass" ] && [ -x "$stage/usr/local/bin/tcbypass" ] || die "pip did not install into $site"
# The image's own copy of the code compiles the program, with this machine's bcc.
mkdir -p "$stage/var/lib/tcbypass/objects"
PYTHONPATH="$site" PYTHONDONTWRITEBYTECODE=1 "$py" -m tcbypass prepare \
    --cache-dir "$stage/var/lib/tcbypass/objects" >&2
rm -f "$stage"/var/lib/tcbypass/objects/.lock-*
# Byte code for the image's interpreter, checked against its magic number; hash-based
# (no source timestamps inside) and recorded with the paths the image will have.
[ "$("$py" -c 'import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())')" = "$(cat "$base/pyc-magic")" ] \
    || die "this machine's $py is not the image's Python version; build on Debian $suite"
"$py" -m compileall -q --invalidation-mode unchecked-hash -s "$stage" -p / "$site" >/dev/null
"$py" "$here/scripts/oci_image.py" layer --root "$stage" --mtime "$SOURCE_DATE_EPOCH" \
    --out "$work/app.tar.gz" --created-by "tcbypass $version ($revision) and its locked wheels, prepared" >/dev/null
say "layer 2 ready in $(elapsed "$t")"

# --- the image -----------------------------------------------------------------------
t=$(date +%s.%N)
created=$(( SOURCE_DATE_EPOCH > base_epoch ? SOURCE_DATE_EPOCH : base_epoch ))
archive="$here/dist/tcbypass-$version.oci.tar"
result=$("$py" "$here/scripts/oci_image.py" image --out "$archive" --ref "${name##*:}" --created "$created" \
    --layer "$base/layer.tar.gz" --layer "$work/app.tar.gz" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env PYTHONDONTWRITEBYTECODE=1 \
    --entrypoint '["tcbypass"]' --cmd '["agent"]' \
    --label org.opencontainers.image.title=tcbypass \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.base.name=debian:$suite (mmdebstrap, mirror state $(date -u -d "@$base_epoch" +%FT%TZ))" \
    --label org.opencontainers.image.licenses=Apache-2.0)
read -r manifest config compressed < <("$py" -c 'import json, sys; r = json.load(sys.stdin); print(r["manifest"], r["config"], r["compressed"])' <<<"$result")
{
    echo "# $name  manifest $manifest  config $config"
    echo "# layer 1: Debian $suite, mirror state $(date -u -d "@$base_epoch" +%FT%TZ), key $base_key"
    sed 's/^/deb /' "$base/packages.txt"
    echo "# layer 2: SOURCE_DATE_EPOCH $SOURCE_DATE_EPOCH, revision $revision"
    (cd "$work/wheels" && sha256sum -- *.whl | awk '{print "wheel " $2 " sha256:" $1}')
    (cd "$stage/var/lib/tcbypass/objects" && sha256sum -- * | awk '{print "object " $2 " sha256:" $1}')
} > "$here/dist/tcbypass-$version.contents.txt"

old=$(podman image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)
skopeo copy --quiet "oci-archive:$archive" "containers-storage:$name" >&2
new=$(podman image inspect --format '{{.Id}}' "$name")
[ "sha256:$new" = "$config" ] || die "the stored image $new is not the built one ($config)"
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || say "note: the previous $name ($old) is still in use; not removed"
fi
say "image stored in $(elapsed "$t")"

size=$(podman image inspect --format '{{.Size}}' "$name")
say "built $name in $(elapsed "$started")"
say "  archive  $archive ($(( $(stat -c %s "$archive") / 1024 / 1024 )) MiB; layers $(( compressed / 1024 / 1024 )) MiB compressed, $(( size / 1024 / 1024 )) MiB unpacked)"
say "  manifest $manifest"
say "  image id $config"
echo "$name"
