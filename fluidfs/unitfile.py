"""The systemd user unit that mounts the backup folder at login and unmounts it at logout.

``fluidfs service install`` writes ``$XDG_CONFIG_HOME/systemd/user/fluidfs.service``
(default ``~/.config/systemd/user``) from ``unit_text``; contrib/systemd/fluidfs.service
is the same text for an installation on the PATH, with the folder ``%h/Backup`` (a test
keeps them in step). Format version 2 (the header comment says so):

- ``ExecStartPre``: ``fluidfs unmount --if-dead MOUNTPOINT [--state-dir S]`` clears the
  dead FUSE mount a crash of this unit's node left (the folder answers ENOTCONN), so
  ``Restart=on-failure`` can mount again; a live mount is never touched. Then
  ``mkdir -p MOUNTPOINT`` (its failure ignored: the mount then says what is wrong);
- ``ExecStart``: ``fluidfs mount --foreground MOUNTPOINT [--keyfile K] [--state-dir S]``,
  the node in the unit's main process, logging to the journal (stderr);
- ``ExecStop``: ``fluidfs unmount MOUNTPOINT``, which returns once the node has sealed,
  committed and exited; systemd's SIGTERM afterwards (or instead, if unmounting fails)
  makes the node do the same (node/session.py), and ``TimeoutStopSec`` leaves it time;
- ``WantedBy=default.target``: the user manager starts it at login and stops it when the
  user's last session ends (unless lingering is on: then it runs from boot to shutdown).

The installed unit names absolute paths (this Python, the folder, the keyfile), each
escaped for systemd's command-line syntax (quotes, ``%`` specifiers, ``$`` variables).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NAME = "fluidfs.service"
FORMAT = 2  # 2: ExecStartPre clears a dead mount (unmount --if-dead)
STOP_TIMEOUT = "15min"  # sealing and uploading what is left can take a while
RESTART_DELAY = "30s"


@dataclass(frozen=True)
class Raw:
    """A word written into the unit as it is: a systemd specifier such as ``%h/Backup``."""

    text: str


Word = str | Raw


def quote(word: Word) -> str:
    """*word* as one argument of an Exec line (systemd.service(5), "Command lines")."""
    if isinstance(word, Raw):
        return word.text
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        raise ValueError(f"{word!r}: control characters cannot go into a unit file")
    escaped = (word.replace("\\", "\\\\").replace('"', '\\"')
               .replace("%", "%%").replace("$", "$$"))
    if not word or any(c.isspace() or c in "'\";" for c in word):
        return f'"{escaped}"'
    return escaped


def command_line(words: Sequence[Word]) -> str:
    """An Exec line's value."""
    return " ".join(quote(w) for w in words)


def unit_text(program: Sequence[Word], mountpoint: Word, mount_options: Sequence[Word] = (),
              mkdir: str = "/usr/bin/mkdir") -> str:
    """The unit that runs ``PROGRAM mount --foreground MOUNTPOINT …`` for the session."""
    state_options = _state_dir_option(mount_options)
    shown = mountpoint.text if isinstance(mountpoint, Raw) else mountpoint.replace("%", "%%")
    return "\n".join([
        f"# fluidfs user unit, format {FORMAT}: mount the backup folder at login, unmount it",
        "# cleanly at logout. Written by `fluidfs service install`; start using it with",
        "#   systemctl --user daemon-reload && systemctl --user enable --now fluidfs.service",
        "[Unit]",
        f"Description=fluidfs backup folder {shown}",
        "",
        "[Service]",
        "Type=exec",
        "ExecStartPre=" + command_line([*program, "unmount", "--if-dead", mountpoint,
                                        *state_options]),
        f"ExecStartPre=-{command_line([mkdir, '-p', mountpoint])}",
        "ExecStart=" + command_line([*program, "mount", "--foreground", mountpoint,
                                     *mount_options]),
        "ExecStop=" + command_line([*program, "unmount", mountpoint]),
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "KillMode=mixed",
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def _state_dir_option(mount_options: Sequence[Word]) -> list[Word]:
    """``--state-dir S`` from the mount's options, for the commands about its mount."""
    words = list(mount_options)
    for i, word in enumerate(words[:-1]):
        if word == "--state-dir":
            return ["--state-dir", words[i + 1]]
    return []


def contrib_text() -> str:
    """contrib/systemd/fluidfs.service: fluidfs from the PATH, mounting ``~/Backup``."""
    return unit_text(["/usr/bin/env", "fluidfs"], Raw("%h/Backup"))


def installed_text(mountpoint: Path, keyfile: Path | None, state_dir: Path | None) -> str:
    """The unit for this installation: this Python runs ``-m fluidfs``, every path absolute."""
    options: list[Word] = []
    if keyfile is not None:
        options += ["--keyfile", str(keyfile.expanduser().absolute())]
    if state_dir is not None:
        options += ["--state-dir", str(state_dir.expanduser().absolute())]
    return unit_text([sys.executable, "-m", "fluidfs"], str(mountpoint.expanduser().absolute()),
                     options, mkdir=shutil.which("mkdir") or "/usr/bin/mkdir")


def user_unit_dir() -> Path:
    """Where the user's systemd manager reads units written by the user."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def write_unit(text: str, directory: Path | None = None) -> Path:
    """Write the unit (atomically, replacing an older one); return its path."""
    directory = directory or user_unit_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NAME
    tmp = directory / f".{NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
