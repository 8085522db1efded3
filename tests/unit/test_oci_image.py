"""scripts/oci_image.py: layers and archives depend on their inputs only."""

from __future__ import annotations

import importlib.util
import json
import os
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "oci_image.py"
spec = importlib.util.spec_from_file_location("oci_image", SCRIPT)
oci_image = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oci_image)

EPOCH = 1_700_000_000


def tree(root: Path, order: list[str], mtime: int) -> Path:
    """The same files, made in a different order and at a different time."""
    contents = {"usr/bin/tool": b"#!/bin/sh\n", "etc/conf": b"x = 1\n", "usr/lib/a": b"a" * 5000}
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[name])
    (root / "usr/bin/tool").chmod(0o755)
    (root / "usr/lib/b").symlink_to("a")
    os.link(root / "usr/lib/a", root / "usr/lib/hard")
    (root / "dev").mkdir()
    (root / "dev/junk").write_bytes(b"left by the build")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    return root


def test_the_same_files_give_the_same_layer_whenever_and_however_they_were_made(tmp_path):
    one = tree(tmp_path / "one", ["usr/bin/tool", "etc/conf", "usr/lib/a"], EPOCH + 100)
    two = tree(tmp_path / "two", ["usr/lib/a", "etc/conf", "usr/bin/tool"], EPOCH + 5000)
    a = oci_image.write_layer(one, tmp_path / "one.tar.gz", EPOCH, ("dev",))
    b = oci_image.write_layer(two, tmp_path / "two.tar.gz", EPOCH, ("dev",))
    assert a == b
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == sorted(members), "sorted, parents first"
    assert "dev" in members and "dev/junk" not in members
    assert {m.mtime for m in members.values()} == {EPOCH}, "clamped to the epoch"
    assert members["usr/lib/hard"].islnk() and members["usr/lib/hard"].linkname == "usr/lib/a"
    assert members["usr/lib/b"].issym() and members["usr/bin/tool"].mode == 0o755
    assert {m.uname for m in members.values()} == {""}


def test_an_archive_is_the_same_bytes_from_the_same_layers(tmp_path):
    root = tree(tmp_path / "root", ["usr/bin/tool", "etc/conf", "usr/lib/a"], EPOCH)
    layer = oci_image.write_layer(root, tmp_path / "layer.tar.gz", EPOCH)
    layer["path"] = str(tmp_path / "layer.tar.gz")
    out = []
    for name in ("a.oci.tar", "b.oci.tar"):
        result = oci_image.write_archive(tmp_path / name, "1.0", EPOCH, [layer], {"Cmd": ["x"]}, {"k": "v"})
        out.append(((tmp_path / name).read_bytes(), result))
    assert out[0] == out[1]
    with tarfile.open(tmp_path / "a.oci.tar") as tar:
        index = json.load(tar.extractfile("index.json"))
        assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "1.0"
        assert f"blobs/sha256/{layer['digest'].split(':')[1]}" in tar.getnames()
