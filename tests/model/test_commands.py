"""`lmforge model info|presets` print the accounting numbers."""

import pytest

from lmforge.cli import main
from lmforge.model import count_params, get_preset


def test_model_info_prints_gpt2_counts(capsys):
    assert main(["model", "info", "--preset", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "85,056,000" in out and "tied head" in out


def test_model_info_overrides_and_moe_active(capsys):
    assert main(["model", "info", "--preset", "moe-small", "--set", "n_layers=2", "moe.top_k=1"]) == 0
    out = capsys.readouterr().out
    cfg = get_preset("moe-small", ["n_layers=2", "moe.top_k=1"])
    c = count_params(cfg)
    active = next(line for line in out.splitlines() if "active per token" in line)
    assert f"{c['total']:,}" in out and f"{c['active']:,}" in active and c["active"] < c["total"]


def test_model_info_unknown_preset_is_one_line_error(capsys):
    assert main(["model", "info", "--preset", "gpt5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'gpt5'" in err and "Traceback" not in err


def test_model_info_bad_override(capsys):
    assert main(["model", "info", "--set", "n_heads=5"]) == 2
    assert "n_heads" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny", "llama-1b"])
def test_presets_listing(capsys, preset):
    assert main(["model", "presets"]) == 0
    assert preset in capsys.readouterr().out
