"""The systemd user unit (unitfile.py) and `fluidfs service install`: what is written, that
systemd accepts it, and that its command lines say what we meant whatever the paths hold.
(That these command lines really mount and unmount: tests/test_service_unit.py.)"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fluidfs import unitfile
from fluidfs.cli.main import main

CONTRIB = Path(__file__).parents[2] / "contrib" / "systemd" / unitfile.NAME
ODD = "/tmp/my backup/100%$HOME \"quoted\" it's"  # spaces, a specifier, a variable, quotes


def verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze --user verify` of *text* as fluidfs.service."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install systemd (contrib/setup.sh)")
    unit_dir, runtime = tmp_path / "units", tmp_path / "runtime"
    unit_dir.mkdir(exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    (unit_dir / unitfile.NAME).write_text(text)
    return subprocess.run([analyze, "--user", "verify", str(unit_dir / unitfile.NAME)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


def exec_lines(text: str, key: str) -> list[list[str]]:
    """The argv systemd makes of each of the unit's *key*= lines (quotes, %% and $$
    undone), in order."""
    return [[w.replace("%%", "%").replace("$$", "$") for w in shlex.split(x[len(key) + 1:])]
            for x in text.splitlines() if x.startswith(key + "=")]


def exec_words(text: str, key: str) -> list[str]:
    """The argv of the unit's one *key*= line."""
    (words,) = exec_lines(text, key)
    return words


def test_the_contrib_unit_is_the_one_the_code_writes_and_systemd_accepts_it(tmp_path):
    text = CONTRIB.read_text()
    assert text == unitfile.contrib_text(), "regenerate contrib/systemd/fluidfs.service"
    result = verify(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert exec_words(text, "ExecStart") == ["/usr/bin/env", "fluidfs", "mount", "--foreground",
                                             "%h/Backup"]
    assert "WantedBy=default.target" in text.splitlines()
    assert exec_lines(text, "ExecStartPre")[0] == ["/usr/bin/env", "fluidfs", "unmount",
                                                   "--if-dead", "%h/Backup"]


def test_verify_would_catch_a_broken_unit(tmp_path):
    broken = unitfile.unit_text(["/nonexistent/fluidfs"], "/tmp/x")
    assert verify(broken, tmp_path).returncode != 0


def test_service_install_writes_the_unit_for_this_user(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key, state = tmp_path / "my.key", tmp_path / "state"
    main(["service", "install", ODD, "--keyfile", str(key), "--state-dir", str(state)])
    path = tmp_path / "config" / "systemd" / "user" / unitfile.NAME
    assert str(path) in capsys.readouterr().out
    text = path.read_text()
    result = verify(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert exec_words(text, "ExecStart") == [sys.executable, "-m", "fluidfs", "mount",
                                             "--foreground", ODD, "--keyfile", str(key),
                                             "--state-dir", str(state)]
    assert exec_words(text, "ExecStop") == [sys.executable, "-m", "fluidfs", "unmount", ODD]
    clear, mkdir = exec_lines(text, "ExecStartPre")
    assert clear == [sys.executable, "-m", "fluidfs", "unmount", "--if-dead", ODD,
                     "--state-dir", str(state)], "a dead mount of this unit's node goes first"
    assert mkdir[-2:] == ["-p", ODD]

    main(["service", "install", "--print"])
    printed = capsys.readouterr().out
    assert exec_words(printed, "ExecStart")[-1] == str(Path.home() / "Backup")
    assert path.read_text() == text, "--print must not write"


def test_a_path_systemd_cannot_carry_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(SystemExit):
        main(["service", "install", "/tmp/new\nline"])
    assert "control characters" in capsys.readouterr().err
    assert not (tmp_path / "config").exists()


def test_if_dead_leaves_a_folder_that_is_no_dead_mount_alone(tmp_path, capsys):
    folder = tmp_path / "Backup"
    folder.mkdir()
    (folder / "mine.txt").write_text("kept")
    main(["unmount", "--if-dead", str(folder), "--state-dir", str(tmp_path / "state")])
    main(["unmount", "--if-dead", str(tmp_path / "missing")])
    assert capsys.readouterr().out == ""
    assert (folder / "mine.txt").read_text() == "kept"
    assert not (tmp_path / "missing").exists()
