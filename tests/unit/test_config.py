"""The configuration: building it from dicts, `--set` parsing, the TOML round trip, keys that moved, resume rules."""

from __future__ import annotations

import re
import tomllib

import pytest

from dagcli.algorithms import ALGORITHMS
from dagcli.config import (
    NON_NEGATIVE_KEYS,
    POSITIVE_KEYS,
    Config,
    config_from_dict,
    dump_toml,
    load_config,
    parse_override,
    read_settings,
    resume_config,
    to_dict,
)
from dagcli.errors import DagError
from helpers import ROOT


def test_config_from_dict_sets_given_keys_and_keeps_defaults():
    c = config_from_dict({"train": {"algorithm": "ddpo", "epochs": 3}, "ddpo": {"clip_range": 1e-3},
                          "dag": {"beta": 7}})
    assert (c.train.algorithm, c.train.epochs, c.ddpo.clip_range) == ("ddpo", 3, 1e-3)
    assert c.dag.beta == 7.0 and isinstance(c.dag.beta, float)  # ints are accepted for floats
    assert c.train.learning_rate == 3e-4 and c.sampling.steps is None  # defaults; steps comes from the model


def _algorithm_ranges():
    """(algorithm, section.key, value, message) for every range its section declares."""
    for algorithm, info in ALGORITHMS.items():
        for key in info.settings.positive:
            yield algorithm, f"{info.section}.{key}", 0, "must be positive"
        for key in info.settings.non_negative:
            yield algorithm, f"{info.section}.{key}", -1, "must not be negative"


@pytest.mark.parametrize("algorithm, key, value, message", [
    *[("dag-db", k, 0, "must be positive") for k in POSITIVE_KEYS],
    *[("dag-db", k, -1, "must not be negative") for k in NON_NEGATIVE_KEYS],
    *_algorithm_ranges(),
])
def test_range_checks_name_the_key(algorithm, key, value, message):
    section, name = key.split(".")
    data = {"train": {"algorithm": algorithm}, "sampling": {"batch_size": 16}}
    data.setdefault(section, {})[name] = value
    with pytest.raises(DagError, match=rf"{key} = -?[0-9.]+: {message}"):
        config_from_dict(data)


@pytest.mark.parametrize("key, value, message", [
    ("grpo.std", "batch", "valid options: global, group"), ("ddpo.clip_range", 0, "must be positive"),
    ("dag.beta", -1.0, "must not be negative"), ("dag.x0_source", "nowhere", "valid options"),
    ("rtb.credit", "bad", "valid options: trajectory, to-go, to-go-x0, to-go-flow")])
def test_every_sections_ranges_and_choices_are_checked_whichever_algorithm_runs(key, value, message):
    section, name = key.split(".")
    other = next(a for a, info in ALGORITHMS.items() if info.section != section)
    with pytest.raises(DagError, match=rf"{re.escape(key)} = .*: {message}"):
        config_from_dict({"train": {"algorithm": other}, section: {name: value}})


def test_how_a_section_fits_the_rest_is_checked_only_when_its_algorithm_runs():
    # grpo.group_size 1 is a valid number; it only fails against the batch it would group, which GRPO alone forms
    c = config_from_dict({"train": {"algorithm": "dag-db"}, "grpo": {"group_size": 1}})
    assert c.grpo.group_size == 1
    with pytest.raises(DagError, match="grpo.group_size"):
        config_from_dict({"train": {"algorithm": "grpo"}, "grpo": {"group_size": 1}})
    with pytest.raises(DagError, match="expected"):  # types are checked whichever algorithm runs
        config_from_dict({"train": {"algorithm": "dag-db"}, "grpo": {"group_size": [1]}})


def test_config_from_dict_reports_every_problem_at_once():
    with pytest.raises(DagError) as e:
        config_from_dict({"train": {"epochs": "ten", "nope": 1, "algorithm": "ppo"}, "bogus": {},
                          "sampling": {"steps": 0}, "lora": {"target_modules": [1]}})
    msg = str(e.value)
    for part in ["train.epochs = 'ten': expected an integer", "unknown key train.nope", "unknown section [bogus]",
                 "train.algorithm = 'ppo': valid options: dag-db, dag-kl, dag-rdb, ddpo", "sampling.steps = 0: must be positive",
                 "lora.target_modules = [1]: expected a list of strings"]:
        assert part in msg, part


def test_moved_keys_say_where_they_live_now():
    with pytest.raises(DagError, match=r"train.flow_learning_rate is now dag.flow_learning_rate"):
        config_from_dict({"train": {"flow_learning_rate": 1e-3}})
    with pytest.raises(DagError, match=r"dag.reduction is now train.reduction"):
        config_from_dict({"dag": {"reduction": "sum"}})


@pytest.mark.parametrize("text, expected", [
    ("train.epochs=10", ("train", "epochs", 10)),
    ("dag.beta=1e2", ("dag", "beta", 100.0)),
    ('reward.spec="aesthetic:1,clip:0.5"', ("reward", "spec", "aesthetic:1,clip:0.5")),
    ("reward.spec=compressibility", ("reward", "spec", "compressibility")),  # not TOML: the raw string
    ("train.gradient_checkpointing=true", ("train", "gradient_checkpointing", True)),
    ('lora.target_modules=["to_q", "to_v"]', ("lora", "target_modules", ["to_q", "to_v"])),
    (" sampling.guidance = 4.5 ", ("sampling", "guidance", 4.5)),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["train.epochs", "epochs=3", "=3"])
def test_parse_override_rejects_malformed(bad):
    with pytest.raises(DagError, match="expected section.key=value"):
        parse_override(bad)


def test_toml_round_trip(tmp_path):
    c = load_config(None, ["train.epochs=7", 'sampling.prompts="shapes"', "sampling.steps=9", "dag.beta=3.5",
                           'lora.target_modules=["to_q"]', 'reward.options={clip = {scale = 2.0}}'])
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(c))
    back = load_config(path)
    assert back == c
    assert to_dict(back)["lora"]["target_modules"] == ["to_q"]
    written = tomllib.loads(path.read_text())["sampling"]
    assert "guidance" not in written and written["steps"] == 9  # unset (the model's default) is left out


def test_dotted_set_reaches_inside_a_table_setting(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[reward]\nspec = "aesthetic,clip"\noptions = {clip = {scale = 2.0}}\n')
    c = load_config(preset, ["reward.options.aesthetic.mlp_path=/w/mlp.pth", "reward.options.clip.model_id=m"])
    assert c.reward.options == {"clip": {"scale": 2.0, "model_id": "m"}, "aesthetic": {"mlp_path": "/w/mlp.pth"}}


def test_overrides_apply_over_a_preset(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[train]\nepochs = 5\nlearning_rate = 1e-3\n')
    given = read_settings(preset, ["train.epochs=6"])
    assert given == {"train": {"epochs": 6, "learning_rate": 1e-3}}


def test_resume_accepts_extension_and_refuses_changes():
    saved = to_dict(config_from_dict({"train": {"epochs": 4}, "reward": {"spec": "compressibility"}}))
    cfg, changes = resume_config(saved, {"train": {"epochs": 8}, "output": {"keep_last": 2}})
    assert cfg.train.epochs == 8 and cfg.reward.spec == "compressibility"
    assert changes == [("train.epochs", 4, 8), ("output.keep_last", 5, 2)]
    same, none = resume_config(saved, {"reward": {"spec": "compressibility"}, "dag": {"beta": 100}})
    assert none == [] and same == config_from_dict(saved)
    with pytest.raises(DagError) as e:
        resume_config(saved, {"dag": {"beta": 5}, "reward": {"spec": "x"}})
    assert "dag.beta = 5.0 differs from the run's 100.0" in str(e.value)
    assert "reward.spec = 'x' differs from the run's 'compressibility'" in str(e.value)


def test_default_config_is_valid():
    assert config_from_dict({}) == Config()


@pytest.mark.parametrize("accumulation, steps, fraction, expected", [
    (200, 50, 1.0, 200),  # the reference: 4 sampler batches x 50 timesteps
    (200, 50, 0.5, 100),  # 4 x 25: the same optimiser steps per epoch with half the transitions
    (200, 50, 0.1, 20),
    (2, 6, 0.5, 1),
    (1, 10, 0.3, 1),  # never below one micro-batch
])
def test_accumulation_scales_with_the_timestep_fraction(accumulation, steps, fraction, expected):
    from dagcli.config import accumulation_steps

    assert accumulation_steps(accumulation, steps, fraction) == expected


def test_lora_targets_default_to_the_model_familys():
    from dagcli.config import fill_model_defaults

    sd, _ = fill_model_defaults(load_config(None, ['model.name="tiny-random"']))
    assert sd.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    flux, _ = fill_model_defaults(load_config(None, ['model.name="tiny-random-flux"']))
    assert flux.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                        "add_v_proj", "to_add_out")
    given, _ = fill_model_defaults(load_config(None, ['model.name="tiny-random-flux"', 'lora.target_modules=["to_q"]']))
    assert given.lora.target_modules == ("to_q",)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_loads_and_its_prompt_file_exists(path):
    cfg = load_config(path)  # raises on an unknown key or a bad value
    prompts = cfg.sampling.prompts
    if prompts and prompts.endswith((".txt", ".jsonl")):  # else a built-in prompt set's name
        assert (ROOT / prompts).is_file(), prompts  # examples name their files from the repository root


@pytest.mark.parametrize("algorithm, tail, message", [
    ("dag-kl", 1, "dag.tail_steps = 1: not with dag-kl"),
    ("dag-rdb", 4, "dag.tail_steps = 4: must be less than sampling.steps = 4"),
])
def test_dag_tail_steps_checks(algorithm, tail, message):
    with pytest.raises(DagError, match=re.escape(message)):
        config_from_dict({"train": {"algorithm": algorithm}, "sampling": {"steps": 4}, "dag": {"tail_steps": tail}})
    config_from_dict({"train": {"algorithm": "dag-db"}, "sampling": {"steps": 4}, "dag": {"tail_steps": 3}})
