"""The H100 IsoFLOP sweep of 2026-11-26 (docs/benchmarks.md, "Scaling laws"): its table is a valid fit
input, and the approach-2 point estimates quoted in the docs come out of it."""

from pathlib import Path

import numpy as np
import pytest

from lmforge.scaling.isoflop import fit_isoflop
from lmforge.scaling.parametric import fit_parametric
from lmforge.scaling.runs import load_runs

TABLE = Path(__file__).parent / "data" / "h100_sweep_2026-11-26.csv"
TRAIN_TOKENS = 174_451_548  # the sweep's training shards (vocabulary 1024)


@pytest.mark.filterwarnings("ignore:IsoFLOP profile")
def test_h100_sweep_table_gives_the_documented_approach_2_exponents():
    runs = load_runs(TABLE)
    assert len(runs) == 31
    # every run saw its data less than once (the sweep refuses otherwise), and C is the counted FLOPs
    assert runs["tokens"].max() < 0.61 * TRAIN_TOKENS
    np.testing.assert_allclose(runs["flops"], runs["flops_per_token"] * runs["tokens"], rtol=1e-9)
    fit = fit_isoflop(runs["params"], runs["flops"], runs["loss"], n_boot=0)
    assert [len(p.n) for p in fit.profiles] == [5, 5, 5, 7, 5, 4]
    # docs: N_opt ∝ C^0.609 (parabola vertices), C^0.643 (arg-min)
    assert fit.n_opt["parabola"].params["a"] == pytest.approx(0.609, abs=1e-3)
    assert fit.n_opt["argmin"].params["a"] == pytest.approx(0.643, abs=1e-3)
    assert fit.d_opt["argmin"].params["a"] == pytest.approx(1 - 0.643, abs=1e-3)
    assert [p.n_argmin for p in fit.profiles] == [76944, 209184, 430752, 430752, 1435040, 3475712]


def test_h100_sweep_parametric_fit_warns_that_e_is_not_determined():
    """On this sweep approach 3 puts E at ~0 (docs: "no usable answer"); the fit says so."""
    runs = load_runs(TABLE)
    with pytest.warns(UserWarning, match="irreducible loss E"):
        fit = fit_parametric(runs["params"], runs["tokens"], runs["loss"], n_boot=0, n_starts=16)
    assert fit.params["E"] < 0.01 * runs["loss"].min()
