"""The typed report (`dagcli.evaluation.schema`): it reads report.json's dictionary and writes it back unchanged
(keys, order, values), and its attributes hold the numbers the report computed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_evaluate import E1, E2, E3, TRIAD, monitor_report, pixel_report

from dagcli.evaluation.schema import Report, RewardStats, as_report


def same_json(a: dict, b: dict) -> bool:
    """Equal as report.json text: the same keys in the same order, the same values (NaN included)."""
    return json.dumps(a, indent=2) == json.dumps(b, indent=2)


@pytest.mark.parametrize("make", [
    lambda: monitor_report(torch.cat([torch.stack([E1, E1, E1]), TRIAD])),  # a warning per prompt, drift
    lambda: monitor_report(torch.stack([E1, E2, E3, E2, E2, E1])),  # no warning
    pixel_report,  # pixel judges: per-image pixels and shares
], ids=["warning", "quiet", "pixels"])
def test_report_json_round_trips_unchanged(make):
    report = make()
    assert same_json(Report.from_dict(report).to_dict(), report)
    assert same_json(Report.from_dict(json.loads(json.dumps(report))).to_dict(), report)


def test_attributes_hold_the_reports_numbers():
    # base 'a green triangle' orthogonal (diversity 1), 'a red circle' E1, E1, E2 (2/3); checkpoint collapses the
    # first prompt (0) and spreads the second 120° apart (1.5): overall 5/6 and 3/4, by hand
    typed = as_report(monitor_report(torch.cat([torch.stack([E1, E1, E1]), TRIAD])))
    base, ckpt = typed.models
    assert (base.overall.metric("diversity"), ckpt.overall.metric("diversity")) == (
        pytest.approx(5 / 6), pytest.approx(3 / 4))
    assert ckpt.prompt("a green triangle").metric("diversity") == pytest.approx(0.0)
    assert ckpt.prompt("a red circle").metric("diversity") == pytest.approx(1.5)
    # rewards 10..15 for the checkpoint: mean 12.5, population std sqrt(35/12); the first prompt's are 10, 11, 12
    assert ckpt.overall.rewards["r"].mean == pytest.approx(12.5)
    assert ckpt.overall.rewards["r"].std == pytest.approx(math.sqrt(35 / 12))
    assert ckpt.prompt("a green triangle").rewards["r"].scores == (10.0, 11.0, 12.0)
    [warning] = typed.warnings
    assert (warning.model, warning.prompt, warning.metric) == ("ckpt", "a green triangle", "diversity")
    assert as_report(typed) is typed


def test_a_prompt_without_images_has_no_block_and_stats_need_no_scores():
    assert as_report(monitor_report(torch.stack([E1, E2, E3, E2, E2, E1]))).models[0].prompt("a cat") is None
    assert RewardStats.from_dict({"mean": 1.0, "std": 0.0}).to_dict() == {"mean": 1.0, "std": 0.0}
