"""The mount's kernel read-ahead (node/session.py): which device is ours, and raising it.

Real files stand in for /proc/self/mountinfo and /sys/class/bdi; the slow layer's
`test_a_sequential_read_comes_in_requests_of_a_mebibyte` checks the effect on a real mount.
"""

from __future__ import annotations

from pathlib import Path

from fluidfs.node.session import READ_AHEAD_KIB, fuse_device, raise_read_ahead


def mountinfo_with(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def ours(device: str, point: str) -> str:
    return (f"47 27 {device} / {point} rw,nosuid,nodev,relatime - fuse.fluidfs "
            f"fluidfs@/state rw,user_id=0,group_id=0,default_permissions")


def bdi_with(tmp_path: Path, device: str, kib: int) -> Path:
    root = tmp_path / "bdi"
    (root / device).mkdir(parents=True)
    (root / device / "read_ahead_kb").write_text(f"{kib}\n")
    return root


def test_our_mount_is_found_by_its_escaped_path_and_raised(tmp_path: Path) -> None:
    """A mountpoint with a space (written as \\040 in mountinfo) is found, and its
    device's read-ahead goes from the kernel's 128 KiB to READ_AHEAD_KIB."""
    point = tmp_path / "my mnt"
    point.mkdir()
    info = mountinfo_with(
        tmp_path,
        "26 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
        ours("0:40", str(point).replace(" ", "\\040")),
    )
    bdi = bdi_with(tmp_path, "0:40", 128)
    assert fuse_device(point, info) == "0:40"
    assert raise_read_ahead(point, bdi=bdi, mountinfo=info) == READ_AHEAD_KIB
    assert (bdi / "0:40" / "read_ahead_kb").read_text() == f"{READ_AHEAD_KIB}\n"


def test_another_filesystem_on_top_or_none_is_left_alone(tmp_path: Path) -> None:
    """Only the fluidfs mount on top at the mountpoint is tuned: not the disk under an
    unmounted mountpoint, not a filesystem someone mounted over ours."""
    point = tmp_path / "mnt"
    point.mkdir()
    bdi = bdi_with(tmp_path, "254:0", 128)
    (bdi / "0:40").mkdir()
    (bdi / "0:40" / "read_ahead_kb").write_text("128\n")
    covered = mountinfo_with(tmp_path, ours("0:40", str(point)),
                             f"50 47 254:0 / {point} rw - ext4 /dev/vda rw")
    assert fuse_device(point, covered) is None
    assert raise_read_ahead(point, bdi=bdi, mountinfo=covered) is None
    unmounted = mountinfo_with(tmp_path, "26 1 254:0 / / rw,relatime - ext4 /dev/vda rw")
    assert raise_read_ahead(point, bdi=bdi, mountinfo=unmounted) is None
    assert (bdi / "254:0" / "read_ahead_kb").read_text() == "128\n"
    assert (bdi / "0:40" / "read_ahead_kb").read_text() == "128\n"


def test_a_larger_read_ahead_is_kept_and_a_refused_write_is_no_error(tmp_path: Path) -> None:
    """An administrator's larger setting stays; without the right to write it (not root)
    the mount goes on with the kernel's."""
    point = tmp_path / "mnt"
    point.mkdir()
    info = mountinfo_with(tmp_path, ours("0:41", str(point)))
    bdi = bdi_with(tmp_path, "0:41", 16384)
    assert raise_read_ahead(point, bdi=bdi, mountinfo=info) == 16384
    assert raise_read_ahead(point, bdi=tmp_path / "no-sysfs", mountinfo=info) is None
