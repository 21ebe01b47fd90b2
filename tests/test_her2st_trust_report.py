"""The her2st benchmark's trust section (issue 23): per-fold table and targets computed from the figures."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import benchmark_modules


@pytest.fixture(scope="module")
def rep():
    with benchmark_modules("_her2st_report", "accuracy_her2st") as mods:
        yield mods


def _fold(c68, c95, rho, rel, rest, novel):
    return {"coverage_68": c68, "coverage_95": c95, "spearman": rho, "reliable_pcc": rel, "rest_pcc": rest,
            "n_reliable": 10, "n_rest": 40, "novel_fraction": novel, "sigma": "mc_dropout",
            "validation": "whole sections", "val_pcc": np.zeros(3), "heldout_pcc": np.zeros(3)}  # fmt: skip


def test_trust_targets_are_computed_from_the_per_fold_figures(rep):
    r, _ = rep
    folds = [[f"C{i}"] for i in range(2, 7)]
    good = SimpleNamespace(folds=folds, trust=[_fold(0.68, 0.95, 0.6, 0.5, 0.3, 0.01) for _ in folds])
    lines = r.trust_lines(good)
    assert len(lines) == 5 and all(line.endswith(": met") for line in lines)
    bad_figs = [_fold(0.40, 0.80, 0.2, 0.5, 0.3, 0.01) for _ in folds]
    bad_figs[2] = _fold(0.40, 0.80, 0.2, 0.2, 0.3, 0.5)  # reliable below the rest, and a mostly novel section
    lines = r.trust_lines(SimpleNamespace(folds=folds, trust=bad_figs))
    assert all(line.endswith("NOT met") for line in lines)
    assert "4/5 folds" in lines[3] and "40.0%" in lines[0]
    text = "\n".join(r.trust_section(good))
    assert "| test C2 |" in text and "| mean |" in text and "whole sections" in text
    assert r.trust_section(SimpleNamespace(folds=folds, trust=None)) == []


def test_benchmark_measures_trust_unless_told_not_to(rep):
    _, acc = rep
    parser_default = acc.parse_args([])
    assert parser_default.trust is True and acc.parse_args(["--no-trust"]).trust is False


def test_novelty_script_runs_on_toy_slides_and_flags_the_altered_ones():
    with benchmark_modules("novelty_her2st") as (novelty,):
        rows = novelty.main(["--toy", "--max-epochs", "1"])
    share = {name.split(", ")[-1]: f for name, _, f, *_ in rows}
    by_colour = {name.split(", ")[-1]: row[3] for name, *row in rows}
    assert len(rows) == 5 and share["toy held-out slide"] < 0.2 and by_colour["toy held-out slide"] < 0.05
    assert share["blank (white)"] > 0.9 and share["colour shift 70,-50,40 (R,G,B)"] > 0.5
    assert by_colour["colour shift 70,-50,40 (R,G,B)"] > 0.9 and by_colour["colour shift 35,-25,20 (R,G,B)"] > 0.9
