#!/usr/bin/env python3
"""Write OCI image layers and an OCI archive, byte for byte the same from the
same inputs. Standard library only: scripts/build-image.sh runs it with the
machine's python3, before any venv exists.

  oci_image.py layer --root DIR --mtime EPOCH --out LAYER.tar.gz [--empty-dir dev ...]
      One gzip-compressed layer of everything under DIR. Writes LAYER.tar.gz.json
      ({"digest", "diff_id", "size"}) next to it and prints the digest.

  oci_image.py image --out IMAGE.oci.tar --ref TAG --created EPOCH --layer LAYER.tar.gz ...
                     [--env K=V] [--label K=V] [--entrypoint JSON] [--cmd JSON]
      An OCI archive (an image layout in a tar) holding one image whose layers
      are the given ones, bottom first. Prints the manifest digest.

What makes the output depend on nothing but the inputs: entries in sorted
order; every mtime clamped to EPOCH; numeric owners without user names; no
atime or ctime; gzip with a zero timestamp and no file name; JSON with
sorted keys. What is kept from the files: mode, owner, content, symlink
targets, hard links (within a layer) and `security.capability`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import time
from pathlib import Path

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
KEPT_XATTRS = ("security.capability",)  # file capabilities; anything else in a layer is a surprise


class _HashingWriter(io.RawIOBase):
    """A sink that hashes and counts what passes through it on its way to `out`."""

    def __init__(self, out):
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


def _walk(root: Path, empty_dirs: frozenset[str]) -> list[str]:
    """Every path under root, relative, sorted byte-wise, parents first;
    directories named in `empty_dirs` appear without their contents."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir in empty_dirs:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            found.append(os.path.join(rel_dir, name) if rel_dir else name)
        # os.walk does not follow symlinked directories: they are listed as names only.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return sorted(found, key=lambda p: p.encode())


def write_layer(root: Path, out: Path, mtime: int, empty_dirs: tuple[str, ...] = ()) -> dict:
    """Write the layer; return {"digest", "diff_id", "size"}."""
    links: dict[tuple[int, int], str] = {}
    with open(out, "wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for rel in _walk(root, frozenset(empty_dirs)):
                    _add(tar, root, rel, mtime, links)
    return {"digest": f"sha256:{compressed.sha.hexdigest()}", "diff_id": f"sha256:{plain.sha.hexdigest()}",
            "size": compressed.size}


def _add(tar: tarfile.TarFile, root: Path, rel: str, mtime: int, links: dict) -> None:
    path = root / rel
    st = os.lstat(path)
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = min(int(st.st_mtime), mtime)
    pax = {}
    for attr in KEPT_XATTRS:
        try:
            pax[f"SCHILY.xattr.{attr}"] = os.getxattr(path, attr, follow_symlinks=False).decode("latin-1")
        except OSError:
            pass
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
        info.type, info.linkname = tarfile.LNKTYPE, links[(st.st_dev, st.st_ino)]
    elif stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = rel
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        raise SystemExit(f"oci_image: {path}: a socket or an unknown file type cannot go into a layer")
    info.pax_headers = pax
    if info.type == tarfile.REGTYPE:
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


# --- the image ---------------------------------------------------------------------
def _json_bytes(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def write_archive(out: Path, ref: str, created: int, layers: list[dict], config: dict,
                  labels: dict[str, str]) -> dict:
    """An OCI archive of one image; return its digests."""
    image_config = {
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
        "os": "linux",
        "created": _rfc3339(created),
        "config": {**config, "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
        "history": [{"created": _rfc3339(created), "created_by": layer.get("created_by", "scripts/build-image.sh")}
                    for layer in layers],
    }
    config_blob = _json_bytes(image_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer["digest"], "size": layer["size"]} for layer in layers],
        "annotations": {"org.opencontainers.image.created": _rfc3339(created)},
    }
    manifest_blob = _json_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": _digest(manifest_blob), "size": len(manifest_blob),
                       "annotations": {"org.opencontainers.image.ref.name": ref}}],
    }
    blobs: dict[str, tuple[bytes | None, Path | None]] = {
        _digest(config_blob): (config_blob, None),
        _digest(manifest_blob): (manifest_blob, None),
    }
    for layer in layers:
        blobs[layer["digest"]] = (None, Path(layer["path"]))
    entries: list[tuple[str, bytes | None, Path | None]] = [
        ("blobs", None, None), ("blobs/sha256", None, None),
        ("index.json", _json_bytes(index), None),
        ("oci-layout", _json_bytes({"imageLayoutVersion": "1.0.0"}), None),
    ]
    entries += [(f"blobs/sha256/{digest.split(':', 1)[1]}", data, path) for digest, (data, path) in blobs.items()]
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, path in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = created, 0, 0, "", ""
            if data is None and path is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif data is not None:
                info.mode, info.size = 0o644, len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.mode, info.size = 0o644, path.stat().st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    os.replace(tmp, out)
    return {"manifest": _digest(manifest_blob), "config": _digest(config_blob),
            "compressed": sum(layer["size"] for layer in layers)}


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"oci_image: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="oci_image.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    layer = sub.add_parser("layer")
    layer.add_argument("--root", required=True, type=Path)
    layer.add_argument("--mtime", required=True, type=int)
    layer.add_argument("--out", required=True, type=Path)
    layer.add_argument("--empty-dir", action="append", default=[], help="keep this directory, not its contents")
    layer.add_argument("--created-by", default="scripts/build-image.sh")
    image = sub.add_parser("image")
    image.add_argument("--out", required=True, type=Path)
    image.add_argument("--ref", required=True)
    image.add_argument("--created", required=True, type=int)
    image.add_argument("--layer", action="append", required=True, type=Path)
    image.add_argument("--env", action="append", default=[])
    image.add_argument("--label", action="append", default=[])
    image.add_argument("--entrypoint", type=json.loads)
    image.add_argument("--cmd", type=json.loads)
    image.add_argument("--workdir", default="/")
    args = parser.parse_args(argv)

    if args.what == "layer":
        meta = write_layer(args.root, args.out, args.mtime, tuple(args.empty_dir))
        meta["created_by"] = args.created_by
        Path(f"{args.out}.json").write_text(json.dumps(meta, sort_keys=True) + "\n")
        print(meta["digest"])
        return 0

    layers = []
    for path in args.layer:
        meta = json.loads(Path(f"{path}.json").read_text())
        layers.append({**meta, "path": str(path)})
    config = {"Env": [f"{k}={v}" for k, v in _pairs(args.env).items()], "WorkingDir": args.workdir}
    if args.entrypoint is not None:
        config["Entrypoint"] = args.entrypoint
    if args.cmd is not None:
        config["Cmd"] = args.cmd
    result = write_archive(args.out, args.ref, args.created, layers, config, _pairs(args.label))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
