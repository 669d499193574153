"""Where PySyft's output goes (syft_split.logs): the user's own folder, never through a
symlink another local user planted."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from syft_split.errors import ConfigError
from syft_split.logs import VERBOSE_ENV, log_path, quiet


@pytest.fixture(autouse=True)
def _own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(VERBOSE_ENV, raising=False)


def test_logs_go_to_a_private_folder_of_the_user(tmp_path: Path) -> None:
    path = log_path("a")
    folder = path.parent
    assert folder == tmp_path / f"syft-split-logs-{os.getuid()}"
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    with quiet(path):
        print("datasite chatter")
    assert path.read_text() == "datasite chatter\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_folder_left_open_to_others_is_closed(tmp_path: Path) -> None:
    folder = tmp_path / f"syft-split-logs-{os.getuid()}"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    assert log_path("a").parent == folder
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"syft-split-logs-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="not a folder"):
        log_path("a")


def test_output_is_never_written_through_a_symlinked_log(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("original\n")
    path = log_path("a")
    path.symlink_to(victim)  # planted beforehand
    with pytest.raises(ConfigError, match="symlink"), quiet(path):
        print("datasite chatter")
    assert victim.read_text() == "original\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="making a folder another user's needs root")
def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / f"syft-split-logs-{os.getuid()}"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 12345)
    with pytest.raises(ConfigError, match="belongs to user 12345"):
        log_path("a")
