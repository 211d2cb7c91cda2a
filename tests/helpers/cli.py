"""Running the real `dag` entry point inside the test process."""

from __future__ import annotations

from pathlib import Path

from dagcli.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dag ARGS`; arguments may be paths."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_tiny_config(folder, model_dir, prompts: list[str], **sections) -> Path:
    """A training preset for a tiny model: 3 trajectories of 4 steps per epoch, micro-batches of 4.

    `sections` override or add keys per section, e.g. `train={"epochs": 2}`, `lora={"alpha": 2.0}`.
    Writes `prompts.txt` and `tiny.toml` into `folder` and returns the TOML path.
    """
    import tomli_w

    folder = Path(folder)
    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    config = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "sampling": {"steps": 4, "guidance": 3.0, "batch_size": 3, "batches_per_epoch": 1,
                     "prompts": str(prompt_file)},
        "reward": {"spec": "compressibility"},
        "train": {"batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-2},
        "dag": {"flow_learning_rate": 1e-2},
    }
    for name, keys in sections.items():
        config.setdefault(name, {}).update(keys)
    path = folder / "tiny.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def train_two_processes(config: Path, dumps: Path) -> list[dict]:
    """Train `config` with two CPU processes (torchrun, gloo) through tests/helpers/dist_train.py -> each rank's dump."""
    import os
    import subprocess
    import sys

    import torch

    here = Path(__file__).parent
    dumps.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(here / "dist_train.py"), str(config), str(dumps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in range(2)]
