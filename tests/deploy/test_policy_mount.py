"""The chart mounts the policy from a ConfigMap as a directory. The kubelet updates such a
volume the way its AtomicWriter does: the new files go into a fresh timestamped directory,
then the `..data` symlink is swapped to it with a rename, and `policy.rules` itself stays a
symlink to `..data/policy.rules`. The gateway's watcher (os.stat, which follows links)
must see that swap, and a policy file reached through links must load."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.edges.access import PolicyFile
from gateway.policy import Target


def _write_generation(volume: Path, stamp: str, text: str) -> Path:
    directory = volume / f"..{stamp}"
    directory.mkdir()
    (directory / "policy.rules").write_text(text)
    return directory


def _swap_data(volume: Path, target: Path) -> None:
    tmp = volume / "..data_tmp"
    tmp.symlink_to(target.name)
    os.rename(tmp, volume / "..data")  # atomic, as the kubelet does


def default(policy: PolicyFile) -> Target:
    return policy.policy.default


def configmap_volume(tmp_path: Path, text: str) -> tuple[Path, Path]:
    volume = tmp_path / "policy"
    volume.mkdir()
    first = _write_generation(volume, "2026_01_01_00_00_00.000000001", text)
    _swap_data(volume, first)
    (volume / "policy.rules").symlink_to("..data/policy.rules")
    return volume, first


def update(volume: Path, old: Path, stamp: str, text: str) -> Path:
    new = _write_generation(volume, stamp, text)
    _swap_data(volume, new)
    for child in old.iterdir():
        child.unlink()
    old.rmdir()
    return new


def test_a_configmap_update_is_seen_and_loaded(tmp_path: Path) -> None:
    volume, first = configmap_volume(tmp_path, "default allow\n")
    policy = PolicyFile(volume / "policy.rules")
    assert default(policy) is Target.ALLOW
    assert not policy.files.changed()

    update(volume, first, "2026_01_01_00_01_00.000000002", "default block\n")
    assert policy.files.changed()
    assert policy.reload()
    assert default(policy) == Target.BLOCK
    assert policy.generation == 2
    assert not policy.files.changed()


def test_an_update_with_same_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    volume, first = configmap_volume(tmp_path, "default allow\n")
    policy = PolicyFile(volume / "policy.rules")
    before = os.stat(volume / "policy.rules")
    same_length = "default block\n"  # as long as "default allow\n"
    new = update(volume, first, "2026_01_01_00_02_00.000000003", same_length)
    os.utime(new / "policy.rules", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(volume / "policy.rules")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert policy.files.changed()  # the inode tells


def test_a_broken_update_keeps_the_policy_in_force(tmp_path: Path) -> None:
    volume, first = configmap_volume(tmp_path, "default allow\n")
    policy = PolicyFile(volume / "policy.rules")
    update(volume, first, "2026_01_01_00_03_00.000000004", "allow frobnicate\n")
    assert policy.files.changed()
    assert not policy.reload()
    assert default(policy) is Target.ALLOW
    assert policy.generation == 1
