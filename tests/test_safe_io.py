"""Output folders checked before work; no write follows a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from longctx.errors import LongctxError
from longctx.safe_io import open_for_write, prepare_output_dir, write_text


def test_prepare_output_dir_creates_and_checks(tmp_path: Path) -> None:
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(LongctxError, match="exists and is not a folder"):
        prepare_output_dir(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(LongctxError, match="is a symlink"):
        prepare_output_dir(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_prepare_output_dir_read_only(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(LongctxError, match="not writable"):
        prepare_output_dir(ro)


def test_no_write_through_symlinks(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "index.html").symlink_to(victim)
    with pytest.raises(LongctxError, match="symlink"):
        write_text(tmp_path / "index.html", "overwritten")
    with pytest.raises(LongctxError, match="symlink"):
        open_for_write(tmp_path / "index.html", "a")
    assert victim.read_text() == "keep me"
    write_text(tmp_path / "plain.txt", "ok")
    with open_for_write(tmp_path / "plain.txt", "a") as f:
        f.write("!")
    assert (tmp_path / "plain.txt").read_text() == "ok!"


def test_eval_run_checks_out_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from longctx.cli import main

    (tmp_path / "file").write_text("x")
    code = main(["eval", "run", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 2 and "longctx: error:" in err and err.count("\n") == 1

