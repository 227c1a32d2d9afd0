"""Facts with one owner: the settings classes and the CLI take them from it, never a copy."""
from __future__ import annotations

import argparse
import typing

import pytest

from common.settings import SettingsError, make_settings
from lottery.grid.ids import fraction_tag
from lottery.grid.settings import GridSettings
from lottery.vae.study import VaeStudySettings, row_id


def _choices(cls, field: str) -> tuple:
    tp = cls.__pydantic_fields__[field].annotation
    while typing.get_origin(tp) is not typing.Literal:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp)


def test_fractions_that_share_an_id_tag_are_refused_and_only_those():
    # round(v, 4) tells 0.1234 and 0.12345 apart, yet both become the id tag '1234'.
    assert fraction_tag(0.1234) == fraction_tag(0.12345) == "1234"
    for field, extra in (("channel_ratios", {"draw": ["1ep"]}), ("sparsities", {}), ("quantiles", {})):
        with pytest.raises(SettingsError, match=f"{field}: values must differ in the first 4 decimals"):
            make_settings(GridSettings, {field: [0.1234, 0.12345], **extra})
    # ... and 0.1235 and 0.12345, which round(v, 4) confuses, have distinct tags: both are fine.
    assert fraction_tag(0.1235) != fraction_tag(0.12345)
    s = make_settings(GridSettings, {"channel_ratios": [0.1235, 0.12345], "draw": ["1ep"]})
    assert s.channel_ratios == (0.1235, 0.12345)


def test_vae_ratios_that_share_a_row_file_are_refused():
    assert row_id("l1", 0.1234) == row_id("l1", 0.12345)
    with pytest.raises(SettingsError, match="ratios: values must differ in the first 4 decimals"):
        make_settings(VaeStudySettings, {"data": "d", "ratios": [0.1234, 0.12345]})
    assert make_settings(VaeStudySettings, {"data": "d", "ratios": [0.1235, 0.12345]}).ratios == (
        0.1235, 0.12345)


@pytest.mark.parametrize("label", ["init", "final", "0ep", "3EP", " 500it", "12ep", "ep", "3xx",
                                   "early_bird", "1234567890ep", "-1ep"])
def test_grid_checkpoint_labels_follow_the_dense_runs_parser(label):
    from train.checkpoints import is_checkpoint_label

    valid = is_checkpoint_label(label.strip().lower())
    for field, extra in (("rewind", {"sparsities": [0.5]}), ("draw", {"channel_ratios": [0.5]})):
        try:
            make_settings(GridSettings, {field: [label], **extra})
            accepted = True
        except SettingsError as err:
            assert "is not a checkpoint of a dense run" in str(err)
            accepted = False
        assert accepted == valid, (field, label)


def test_grid_choices_come_from_their_owners():
    from lottery.points.task import CONTROLS
    from lottery.prune import channel_masks, masks
    from lottery.prune.criteria import CRITERIA, WEIGHT_CRITERIA

    assert _choices(GridSettings, "scope") == masks.SCOPES == channel_masks.SCOPES
    assert _choices(GridSettings, "channel_scope") == masks.SCOPES
    assert _choices(GridSettings, "criterion") == CRITERIA
    controls = typing.get_args(GridSettings.__pydantic_fields__["controls"].annotation)[0]
    assert typing.get_args(controls) == tuple(c for c in CONTROLS if c != "none")
    vae_criteria = typing.get_args(VaeStudySettings.__pydantic_fields__["criteria"].annotation)[0]
    assert typing.get_args(vae_criteria) == WEIGHT_CRITERIA


def test_lottery_run_defaults_are_the_schedulers():
    from lottery import cli
    from lottery.grid.claims import DEFAULT_STALE_AFTER
    from lottery.grid.coordinator import DEFAULT_SILENCE_TIMEOUT
    from lottery.grid.scheduler import DEFAULT_EXECUTOR

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["run", "--grid", "g"])
    assert (args.executor, args.stale_after, args.silence_timeout, args.heartbeat) == (
        DEFAULT_EXECUTOR, DEFAULT_STALE_AFTER, DEFAULT_SILENCE_TIMEOUT, None)
    assert parser.parse_args(["status", "--grid", "g"]).stale_after == DEFAULT_STALE_AFTER
