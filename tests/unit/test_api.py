"""`dagcli.api`: the commands' engine called from Python (train, sample, evaluate, export), and the README's
notebook example run as written."""

from __future__ import annotations

import json
import re

import pytest

from dagcli import api
from dagcli.errors import DagError
from helpers import ROOT
from helpers.cli import write_tiny_config

PROMPTS = ["a red circle", "a blue square"]


class Recorder:
    """A reporter that keeps what it is told."""

    def __init__(self):
        self.lines: list[str] = []
        self.tasks: list[tuple[str, int]] = []

    def task(self, description: str, total: int):
        from contextlib import contextmanager

        @contextmanager
        def advancing():
            self.tasks.append((description, total))
            yield lambda n=1: None

        return advancing()

    def info(self, message: str) -> None:
        self.lines.append(message)

    def warn(self, message: str) -> None:
        self.lines.append("warning: " + message)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir):
    """A 1-epoch run of the api on the tiny model -> (result, preset, the reporter it was given)."""
    root = tmp_path_factory.mktemp("api-run")
    preset = write_tiny_config(root, tiny_pipeline_dir, PROMPTS, train={"epochs": 1})
    recorder = Recorder()
    started = []
    result = api.train(preset, output=root / "run", reporter=recorder, on_start=started.append)
    assert len(started) == 1 and started[0].config.output.dir == str(root / "run")
    return result, preset, recorder


def test_train_returns_the_run_and_its_last_metrics(trained):
    result, _, _ = trained
    assert result.epochs == 1 and not result.already_finished
    assert result.checkpoint == result.run_dir / "checkpoints" / "step-000001"
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert result.metrics == json.loads(lines[-1]) and result.metrics["epoch"] == 1


def test_the_reporter_hears_the_defaults_the_model_filled_in(trained):
    _, _, recorder = trained
    said = [line for line in recorder.lines if line.startswith("settings not given")]
    assert len(said) == 1 and "eta 1" in said[0]  # the preset leaves the sampler's eta to the model
    assert recorder.tasks  # progress went to the given reporter


def test_a_finished_run_resumed_trains_nothing(trained):
    result, preset, _ = trained
    recorder = Recorder()
    again = api.train(preset, output=result.run_dir, resume=True, reporter=recorder)
    assert again.already_finished and again.epochs == 1 and again.checkpoint == result.checkpoint
    assert recorder.lines == [f"{result.run_dir} is finished: 1 of 1 epochs done; to train it further, "
                              "pass --resume --epochs N with N > 1"]


def test_model_defaults_are_filled_once_per_run(tmp_path, tiny_pipeline_dir, monkeypatch):
    from dagcli import config, trainer

    calls = []
    original = config.fill_model_defaults

    def counted(cfg):
        calls.append(cfg.model.name)
        return original(cfg)

    monkeypatch.setattr(config, "fill_model_defaults", counted)
    monkeypatch.setattr(trainer, "fill_model_defaults", counted)
    preset = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"epochs": 1},
                               sampling={"batch_size": 2, "steps": 2})
    api.train(preset, output=tmp_path / "run")
    assert calls == [str(tiny_pipeline_dir)]
    trainer.Trainer(config.load_config(preset), PROMPTS)  # built without a plan it fills them itself
    assert len(calls) == 2


def test_plan_resolves_without_loading_a_model(tmp_path, tiny_pipeline_dir):
    from dagcli.models import model_defaults

    preset = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS)
    plan = api.plan_training(preset, epochs=3, guidance=2.5, output=tmp_path / "run")
    assert (plan.config.train.epochs, plan.config.sampling.guidance) == (3, 2.5)  # flags over the preset
    assert plan.config.sampling.eta == model_defaults(str(tiny_pipeline_dir)).eta == 1.0  # the model's
    assert plan.prompts == tuple(PROMPTS) and plan.resume_from is None
    assert "eta 1" in plan.defaults_used and not (tmp_path / "run").exists()


def test_a_setting_of_another_algorithms_section_is_warned_about(tmp_path, tiny_pipeline_dir):
    preset = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS)
    recorder = Recorder()
    plan = api.plan_training(preset, algorithm="dag-db", output=tmp_path / "run", reporter=recorder,
                             overrides=['rtb.credit="to-go"', "dag.beta=3.0", "train.epochs=2", "grpo.group_size=4"])
    assert plan.config.rtb.credit == "to-go" and plan.config.dag.beta == 3.0
    assert [line for line in recorder.lines if line.startswith("warning: ")] == [
        "warning: --set rtb.credit: dag-db does not read rtb.* (only rtb does); the setting has no effect",
        "warning: --set grpo.group_size: dag-db does not read grpo.* (only grpo does); the setting has no effect"]
    recorder.lines.clear()  # dag-rdb reads the [dag] section of dag-db and dag-kl
    api.plan_training(preset, algorithm="dag-rdb", output=tmp_path / "run", reporter=recorder,
                      overrides=["dag.proximity=0.5"])
    assert recorder.lines == []
    api.plan_training(preset, algorithm="rtb", output=tmp_path / "run", reporter=recorder,
                      overrides=["dag.beta=1.0", "rtb.group_size=1"])
    assert recorder.lines == ["warning: --set dag.beta: rtb does not read dag.* (only dag-db, dag-kl, dag-rdb do); "
                              "the setting has no effect"]


def test_sample_returns_the_images_it_wrote(trained, tmp_path):
    result, _, _ = trained
    out = tmp_path / "shots"
    shots = api.sample(prompt=PROMPTS, ckpt=result.run_dir, num_per_prompt=2, steps=3, output=out)
    assert shots.prompts == 2 and shots.manifest == out / "samples.jsonl"
    assert sorted(shots.images) == sorted(out.glob("0*-s*.png")) and len(shots.images) == 4
    records = [json.loads(line) for line in shots.manifest.read_text().splitlines()]
    assert [out / r["file"] for r in records] == list(shots.images)
    assert {r["ckpt"] for r in records} == {str(result.checkpoint)}
    (summary,) = api.score(out, reward="compressibility")
    assert summary.count == 4 and summary.name == "compressibility"


def test_evaluate_returns_the_report(trained, tmp_path):
    result, _, _ = trained
    out = tmp_path / "eval"
    ev = api.evaluate(reward="compressibility", prompt=PROMPTS[:1], ckpt=[result.run_dir], num_per_prompt=2,
                      steps=3, embed_model="none", output=out)
    assert ev.report_path == out / "report.json" and (out / "report.html").is_file()
    assert ev.report == json.loads(ev.report_path.read_text())
    assert ev.report["settings"]["checkpoints"] == [str(result.checkpoint.resolve())]


def test_export_returns_the_files_it_wrote(trained, tmp_path):
    result, _, _ = trained
    kohya = api.export(result.run_dir, format="kohya", output=tmp_path / "lora.safetensors")
    assert kohya.files == (tmp_path / "lora.safetensors",) and kohya.checkpoint == result.checkpoint
    folder = api.export(result.run_dir, format="diffusers", output=tmp_path / "lora", step=1)
    assert folder.files == tuple(sorted(p for p in (tmp_path / "lora").rglob("*") if p.is_file()))
    assert any(p.suffix == ".safetensors" for p in folder.files)


@pytest.mark.parametrize("call, needle", [
    (lambda tmp: api.train(model="no-such-model", output=tmp / "r"), "'no-such-model'"),
    (lambda tmp: api.train(model="tiny", batch_size=0, output=tmp / "r"), "--batch-size 0"),
    (lambda tmp: api.train(model="tiny", algorithm="ppo", output=tmp / "r"), "--algorithm ppo: valid options: dag-db"),
    (lambda tmp: api.sample(prompt=["x"], num_per_prompt=0, output=tmp / "s"), "--num-per-prompt must be positive, got 0"),
    (lambda tmp: api.sample(prompt="a red circle", output=tmp / "s"), "prompt=['a red circle']"),
    (lambda tmp: api.sample(output=tmp / "s"), "no prompts given"),
    (lambda tmp: api.evaluate(reward="no-such-reward", prompt=["x"], output=tmp / "e"), "'no-such-reward'"),
    (lambda tmp: api.evaluate(reward="compressibility", prompt=["x"], hack_threshold=2.0), "got 2.0"),
    (lambda tmp: api.export(tmp, format="zip", output=tmp / "o"), "'zip'; valid options: diffusers, kohya, merged"),
    (lambda tmp: api.export(tmp, format="kohya"), "--output is required"),
    (lambda tmp: api.score(tmp, batch_size=0), "--batch-size must be positive, got 0"),
    (lambda tmp: api.reward_server("compressibility", port=70000), "--port must be 0 to 65535, got 70000"),
    (lambda tmp: api.reward_server("no-such-reward", port=0), "'no-such-reward'"),
])
def test_bad_input_raises_dag_error_naming_the_value(call, needle, tmp_path):
    with pytest.raises(DagError, match=re.escape(needle)):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def readme_example() -> str:
    """The Python block of the README's notebook section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using dagcli from Python (a notebook)", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "checkpoints/step-000001" in out and "report.json" in out
    assert (tmp_path / "notebook.safetensors").is_file() and (tmp_path / "eval" / "notebook" / "report.html").is_file()
    assert len(list((tmp_path / "samples" / "notebook").glob("grid-*.png"))) == 1
