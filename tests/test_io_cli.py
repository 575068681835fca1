import pytest

from lmforge import io
from lmforge.cli import main


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    p = tmp_path / "a.json"
    io.write_json(p, {"v": 1})
    with pytest.raises(RuntimeError), io.atomic_file(p, "w") as f:
        f.write("partial")
        raise RuntimeError("crash mid-write")
    assert io.read_json(p) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_atomic_writes_get_umask_permissions_not_mkstemp_0600(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        io.write_text(tmp_path / "f.txt", "x")
        with io.atomic_dir(tmp_path / "d") as t:
            (t / "y").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_atomic_dir_replaces_whole_directory(tmp_path):
    d = tmp_path / "ckpt"
    with io.atomic_dir(d) as t:
        (t / "x").write_text("1")
    with pytest.raises(RuntimeError), io.atomic_dir(d) as t:
        (t / "x").write_text("2")
        raise RuntimeError
    assert (d / "x").read_text() == "1"


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "lmforge" in capsys.readouterr().out
    assert main([]) == 1
