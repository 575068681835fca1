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
