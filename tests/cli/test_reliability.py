"""Reliability: a table of bad inputs (one line, exit 2, no traceback), faults during training, crash safety,
and a scan of the source for unsafe loading."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dagcli.cli import main
from helpers import ROOT
from helpers.cli import run_cli

SRC = ROOT / "src" / "dagcli"

PLUGINS = '''
import torch

class _Reward:
    slow = False
    def __init__(self, fn):
        self.fn = fn
    def __call__(self, images, prompts, metadata=None):
        return self.fn(images, prompts)

def raises():
    def fn(images, prompts):
        raise RuntimeError("scorer exploded")
    return _Reward(fn)

def wrong_shape():
    return _Reward(lambda images, prompts: torch.zeros(images.shape[0], 2))

def all_nan():
    return _Reward(lambda images, prompts: torch.full((images.shape[0],), float("nan")))

def nan_for_squares():
    def fn(images, prompts):
        out = -images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor(["square" in p for p in prompts]), float("nan"), out)
    return _Reward(fn)

def factory_raises():
    raise ValueError("bad set-up")

def huge():  # finite, so not dropped, but rtb's beta * r overflows float32 in every loss
    return _Reward(lambda images, prompts: torch.full((images.shape[0],), 3e38))
'''




@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_pipeline_dir):
    """Prompt files, a plugin module, a tiny training config and a real checkpoint to corrupt."""
    d = tmp_path_factory.mktemp("rel")
    (d / "prompts.txt").write_text("a red circle\na blue square\n")
    (d / "empty.txt").write_text("\n# nothing\n")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02\x03")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    (d / "plug.py").write_text(PLUGINS)
    (d / "syntax.toml").write_text("[train\nepochs = 3\n")
    (d / "not-a-dir").write_text("a file")
    (d / "tiny.toml").write_text(f"""
[model]
name = "{tiny_pipeline_dir}"
device = "cpu"
[sampling]
steps = 3
guidance = 3.0
batch_size = 2
batches_per_epoch = 1
prompts = "{d / 'prompts.txt'}"
[reward]
spec = "compressibility"
[train]
batch_size = 2
gradient_accumulation_steps = 3
learning_rate = 1e-2
[dag]
beta = 1.0
beta_ramp_epochs = 0
[output]
checkpoint_every = 1
keep_last = 10
""")
    try:
        main(["train", "--config", str(d / "tiny.toml"), "--epochs", "1", "-o", str(d / "run")])
    except SystemExit as e:
        assert e.code == 0
    return d


def bad_cases(d: Path, model: str) -> list[tuple[list, str]]:
    tiny = ["--config", d / "tiny.toml", "-o", d / "out-bad"]
    step = d / "run" / "checkpoints" / "step-000001"
    return [
        # dag sample
        (["sample", "-p", "x", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["sample", "-p", "x", "--model", str(d)], "model_index.json"),
        (["sample", "--prompts", d / "missing.txt"], "missing.txt"),
        (["sample", "--prompts", d / "empty.txt"], "no prompts"),
        (["sample", "--prompts", d / "binary.txt"], "binary"),
        (["sample", "--prompts", d / "latin1.txt"], "not UTF-8"),
        (["sample", "--prompts", d / "bad.jsonl"], "line 2"),
        (["sample", "--prompts", d], "is a directory"),
        (["sample", "-p", "x", "--steps", "0"], "--steps must be positive"),
        (["sample", "-p", "x", "--steps", "-5"], "--steps must be positive"),
        (["sample", "-p", "x", "--eta", "1.5"], "--eta must be in [0, 1]"),
        (["sample", "-p", "x", "--eta", "-0.1"], "--eta must be in [0, 1]"),
        (["sample", "-p", "x", "-n", "0"], "--num-per-prompt must be positive"),
        (["sample", "-p", "x", "--batch-size", "0"], "--batch-size must be positive"),
        (["sample", "-p", "x", "--height", "-32"], "--height must be positive"),
        (["sample", "-p", "x", "--ckpt", d / "nope"], "nope"),
        (["sample", "-p", "x", "--model", model, "-o", d / "not-a-dir" / "sub"], "cannot be written"),
        (["sample", "-p", "x", "--model", model, "--device", "tpu"], "valid options: auto, cpu, cuda"),
        (["sample", "-p", "x", "--model", model, "--dtype", "fp8"], "valid options: fp32, bf16, fp16"),
        (["sample", "-p", "x", "--model", model, "--height", "30"], "multiple of"),
        # dag train: configuration
        (["train", *tiny, "--reward", "nope"], "unknown reward 'nope'"),
        (["train", *tiny, "--algorithm", "ppo"], "--algorithm ppo: valid options"),
        (["train", "--config", d / "syntax.toml"], "not valid TOML"),
        (["train", "--config", d / "missing.toml"], "missing.toml"),
        (["train", *tiny, "--set", "train.nope=1"], "unknown key train.nope"),
        (["train", *tiny, "--set", "nosection.key=1"], "unknown section [nosection]"),
        (["train", *tiny, "--set", 'train.epochs="ten"'], "expected an integer"),
        (["train", *tiny, "--set", "train.batch_size=4"], "does not divide"),
        (["train", *tiny, "--set", "sampling.eta=0"], "stochastic sampler"),
        (["train", *tiny, "--algorithm", "dag-kl", "--train-batch-size", "1"], "at least 2"),
        (["train", *tiny, "--set", "dag.beta=-1"], "dag.beta = -1.0: must not be negative"),
        (["train", *tiny, "--set", "lora.rank=0"], "lora.rank = 0: must be positive"),
        (["train", *tiny, "--set", "garbage"], "expected section.key=value"),
        (["train", *tiny, "--prompts", d / "empty.txt"], "no prompts"),
        (["train", *tiny, "--report-to", "mlflow"], "--report-to mlflow: valid options"),
        # dag train: resuming
        (["train", *tiny, "--resume"], "no checkpoints to resume"),
        (["train", *tiny, "--resume-from", d / "nope"], "not found"),
        (["train", *tiny, "--resume-from", d], "no pytorch_lora_weights"),
        (["train", *tiny, "--resume-from", step, "--model", "tiny-random"], "--model tiny-random differs from the run's"),
        (["train", *tiny, "--resume-from", step, "--set", "lora.rank=8"], "lora.rank = 8 differs from the run's 4"),
        (["train", "--config", d / "tiny.toml", "-o", d / "run"], "already has checkpoints"),
        # reward plugins
        (["train", *tiny, "--reward", "no_such_module:make"], "no_such_module"),
        (["train", *tiny, "--reward", f"{d / 'plug.py'}:missing_factory"], "missing_factory"),
        (["train", *tiny, "--reward", f"{d / 'plug.py'}:factory_raises"], "bad set-up"),
        # ... and two that fail only once training has started (after the start-up banner)
        (["train", *tiny, "--reward", f"{d / 'plug.py'}:raises", "-o", d / "o1"], "scorer exploded"),
        (["train", *tiny, "--reward", f"{d / 'plug.py'}:wrong_shape", "-o", d / "o2"], "shape"),
        (["rewards", "--score", d / "no-images", "--reward", "compressibility"], "no-images"),
    ]


def test_bad_input_table(files, tiny_pipeline_dir, capsys):
    before = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    failures = []
    runtime = {"scorer exploded", "shape"}  # these fail after the banner: only the error line is checked
    for args, needle in bad_cases(files, str(tiny_pipeline_dir)):
        code, _, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        one_line = len(errors) == 1 and needle in errors[0] and (needle in runtime or len(lines) == 1)
        if code != 2 or not one_line or "Traceback" in err:
            failures.append(f"{args[:1] + [str(a)[-30:] for a in args[1:]]}: code={code} err={err.strip()[:300]!r}")
    assert not failures, "\n".join(failures)
    # nothing lost on disk: every file there before (the run and its checkpoint among them) is still there, unchanged
    changed = [str(p.relative_to(files)) for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
    assert not changed, changed


def test_debug_flag_shows_traceback(capsys):
    with pytest.raises(Exception) as info:
        main(["--debug", "sample", "-p", "x", "--model", "no-such-model"])
    assert "no-such-model" in str(info.value)


def test_long_prompt_is_truncated_with_a_warning(tiny_pipeline_dir, tmp_path, capsys):
    long_prompt = " ".join(["red circle"] * 40)
    code, _, err = run_cli(["sample", "--model", tiny_pipeline_dir, "-p", long_prompt, "-n", "1", "--steps", "2",
                            "-o", tmp_path], capsys)
    assert code == 0 and "truncated" in err


def test_corrupt_checkpoint_files_are_detected(files, tmp_path, capsys):
    import shutil

    step = tmp_path / "step-000001"
    shutil.copytree(files / "run" / "checkpoints" / "step-000001", step)
    lora = step / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:-7] + b"garbage")
    code, _, err = run_cli(["sample", "-p", "x", "--ckpt", step, "-o", tmp_path / "s"], capsys)
    assert code == 2 and "checksum" in err
    flow = step / "flow.safetensors"
    flow.write_bytes(b"not a safetensors file")
    code, _, err = run_cli(["train", "--config", files / "tiny.toml", "-o", tmp_path / "r", "--resume-from", step],
                           capsys)
    assert code == 2 and "checksum" in err and len(err.strip().splitlines()) == 1


def test_nan_rewards_are_dropped_then_stop_with_a_checkpoint(files, tmp_path, capsys):
    plug = files / "plug.py"
    run = tmp_path / "nan"
    code, _, err = run_cli(["train", "--config", files / "tiny.toml", "--epochs", "3", "-o", run,
                            "--reward", f"{plug}:nan_for_squares", "--set", "reward.max_nonfinite=100"], capsys)
    assert code == 0, err
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and metrics[-1]["nonfinite_rewards"] > 0
    assert f"dropped {metrics[0]['nonfinite_rewards']} trajectories with NaN/inf rewards" in err
    assert all("a blue square" not in m["per_prompt_reward"] for m in metrics)  # the NaN ones never count
    stop = tmp_path / "stop"
    code, _, err = run_cli(["train", "--config", files / "tiny.toml", "--epochs", "3", "-o", stop,
                            "--reward", f"{plug}:all_nan", "--set", "reward.max_nonfinite=1"], capsys)
    assert code == 2 and "max_nonfinite" in err
    assert (stop / "checkpoints" / "step-000000" / "meta.json").is_file()


def test_an_epoch_whose_every_loss_is_nan_stops_the_run_with_its_last_checkpoint(files, tmp_path, capsys):
    run = tmp_path / "huge"
    code, _, err = run_cli(["train", "--config", files / "tiny.toml", "--epochs", "3", "-o", run, "--algorithm",
                            "rtb", "--set", 'rtb.log_z="learned"', "--set", "rtb.group_size=1",
                            "--reward", f"{files / 'plug.py'}:huge"], capsys)
    lines = [x for x in err.splitlines() if x.startswith("error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "stopping in epoch 1: the loss was NaN/inf in every micro-batch (3), so nothing was trained" in lines[0]
    assert lines[0].endswith("no checkpoint had been saved yet") and (run / "config.toml").is_file()
    assert not (run / "checkpoints" / "step-000001").exists()  # nothing of the failed epoch is saved


def _train_killed(config: Path, out: Path, fault: str) -> subprocess.CompletedProcess:
    """A training run in a child process that SIGKILLs itself at the named fault point, on this process's number
    of threads (another count sums in another order: the resumed weights would differ from `_train_here`'s)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DAGCLI_FAULT=fault, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, "-m", "dagcli", "train", "--config", config, "--epochs", "3",
                           "-o", out], capture_output=True, text=True, env=env, timeout=600)


def _train_here(config: Path, out: Path, *extra, capsys=None) -> None:
    """A training run in this process (no fault points armed)."""
    try:
        main(["train", "--config", str(config), "--epochs", "3", "-o", str(out), *map(str, extra)])
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err if capsys else e.code


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:06d}"
    return {**load_file(folder / "pytorch_lora_weights.safetensors"), **load_file(folder / "flow.safetensors")}


def test_sigkill_at_any_point_then_resume_equals_uninterrupted(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DAGCLI_FAULT", raising=False)
    config = files / "tiny.toml"
    clean = tmp_path / "clean"
    _train_here(config, clean, capsys=capsys)
    reference = _weights(clean, 3)
    counters = _epoch_counters(clean)
    assert [c[0] for c in counters] == [1, 2, 3]
    for fault in ("optimizer-step:2", "checkpoint-write:2", "checkpoint-rename:3"):
        run = tmp_path / fault.replace(":", "-")
        killed = _train_killed(config, run, fault)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
        for name in steps:  # every checkpoint left behind is complete and verifiable
            meta = json.loads((run / "checkpoints" / name / "meta.json").read_text())
            assert set(meta["sha256"]) >= {"pytorch_lora_weights.safetensors", "flow.safetensors"}
        _train_here(config, run, "--resume", capsys=capsys)
        final = _weights(run, 3)
        assert final.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(final[k], reference[k], rtol=0, atol=1e-6)
        assert not list((run / "checkpoints").glob(".tmp-*"))
        # one line per epoch, 1 to 3, each as the uninterrupted run logged it (the killed epoch's line is gone)
        assert _epoch_counters(run) == counters, fault


def _epoch_counters(run: Path) -> list[tuple[int, int, int]]:
    """(epoch, optimizer_steps, trajectories_seen) of every line of a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(m["epoch"], m["optimizer_steps"], m["trajectories_seen"]) for m in lines]


def test_sigint_saves_a_checkpoint_and_exits_130(files, tmp_path):
    run = tmp_path / "int"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dagcli", "train", "--config", files / "tiny.toml",
                             "--epochs", "200", "--set", "output.checkpoint_every=1000", "-o", run],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    steps = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(steps) == 1 and err.splitlines()[-1] == (f"interrupted: stopped after epoch {int(steps[0][5:])}; the "
                                                        f"last checkpoint is {run / 'checkpoints' / steps[0]} "
                                                        f"(epoch {int(steps[0][5:])}); resume with --resume")
    assert "Traceback" not in err


def call_arguments(text: str, start: int) -> str:
    """The text between the parentheses of a call whose '(' is at `start` (balanced)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    return text[start + 1 :]


def unsafe_torch_load(text: str) -> list[int]:
    """Offsets of torch.load calls that do not pass weights_only=True."""
    return [m.start() for m in re.finditer(r"torch\.load\(", text)
            if not re.search(r"weights_only\s*=\s*True", call_arguments(text, m.end() - 1))]


UNSAFE = [
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\byaml\.load\("), "yaml.load"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
]


def test_source_has_no_unsafe_loading():
    found = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        hits = [(offset, "torch.load without weights_only=True") for offset in unsafe_torch_load(text)]
        hits += [(m.start(), what) for pattern, what in UNSAFE for m in pattern.finditer(text)]
        for offset, what in hits:
            found.append(f"{path.relative_to(SRC)}:{text[:offset].count(chr(10)) + 1}: {what}")
    assert not found, found
    # the scan itself finds what it looks for
    assert unsafe_torch_load("x = torch.load(open(f))") == [4]
    assert unsafe_torch_load("torch.load(str(p), map_location='cpu', weights_only=True)") == []
    assert UNSAFE[0][0].search("from_pretrained(x, trust_remote_code=True)")
