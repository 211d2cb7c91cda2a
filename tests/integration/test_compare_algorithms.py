"""benchmarks/compare_algorithms.py: evaluation points during training and the summary arithmetic."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_algorithms", ROOT / "benchmarks" / "compare_algorithms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diversity_at_interpolates_between_evaluation_points(compare) -> None:
    evals = [{"eval_reward": -1.0, "diversity": 0.20}, {"eval_reward": -0.8, "diversity": 0.10},
             {"eval_reward": -0.6, "diversity": 0.05}]
    assert compare.diversity_at(evals, -0.9) == pytest.approx(0.15)
    assert compare.diversity_at(evals, -0.7) == pytest.approx(0.075)
    assert compare.diversity_at(evals, -1.5) == pytest.approx(0.20)  # reached before training
    assert compare.diversity_at(evals, -0.5) is None


def test_summary_level_and_trajectories(compare) -> None:
    def run(algo, rewards, evals):
        curve = [{"trajectories": 10 * (i + 1), "reward": r} for i, r in enumerate(rewards)]
        return {"algorithm": algo, "curve": curve, "evals": evals, "eval_reward": evals[-1]["eval_reward"],
                "diversity": evals[-1]["diversity"], "fidelity": 1.0, "train_seconds": 1.0}

    runs = [run("ddpo", [-1.0, -0.9, -0.8, -0.8, -0.8], [{"eval_reward": -1.0, "diversity": 0.2},
                                                           {"eval_reward": -0.8, "diversity": 0.1}]),
            run("dag-db", [-1.0, -0.7, -0.6, -0.6, -0.6], [{"eval_reward": -1.0, "diversity": 0.2},
                                                             {"eval_reward": -0.6, "diversity": 0.16}])]
    s = compare.summarize(runs)
    assert s["level"] == pytest.approx(-0.8) and s["eval_level"] == pytest.approx(-0.8)
    db = s["algorithms"]["dag-db"]
    # 3-epoch means: dag-db -1.0, -0.85, -0.767 (reached at 30); ddpo -1.0, -0.95, -0.9, -0.833, -0.8 (at 50)
    assert s["reference"] == "ddpo"  # no GRPO run: DDPO's level
    assert db["trajectories_to_level"]["mean"] == 30
    assert db["diversity_at_eval_level"]["mean"] == pytest.approx(0.18)
    assert s["algorithms"]["ddpo"]["trajectories_to_level"]["mean"] == 50
    assert "| dag-db |" in compare.table(s) and "(1/1 runs)" in compare.table(s)


def test_summary_with_grpo_reference_and_mode_metrics(compare) -> None:
    def run(algo, rewards, evals):
        curve = [{"trajectories": 10 * (i + 1), "reward": r} for i, r in enumerate(rewards)]
        last = evals[-1]
        return {"algorithm": algo, "curve": curve, "evals": evals, "eval_reward": last["eval_reward"],
                "diversity": last["diversity"], "fidelity": 1.0, "train_seconds": 1.0, "tv": last["tv"],
                "split_tv": last["split_tv"],
                "modes_kept": last["modes_kept"], "modes_possible": 6,
                "shares": {"black": 0.5, "white": 0.5, "gray": 0.0, "brown": 0.0}}

    def point(reward, tv, kept):
        return {"eval_reward": reward, "diversity": 0.1, "tv": tv, "split_tv": tv / 2, "modes_kept": kept}

    runs = [run("grpo", [0.4, 0.6, 0.8, 0.8, 0.8], [point(0.4, 0.5, 6), point(0.8, 0.4, 3)]),
            run("ddpo", [0.4, 0.5, 0.5, 0.5, 0.5], [point(0.4, 0.5, 6), point(0.5, 0.45, 6)]),
            run("dag-db", [0.4, 0.9, 0.9, 0.9, 0.9], [point(0.4, 0.5, 6), point(1.0, 0.1, 6)])]
    s = compare.summarize(runs)
    assert s["reference"] == "grpo" and s["level"] == pytest.approx(0.8) and s["eval_level"] == pytest.approx(0.8)
    db = s["algorithms"]["dag-db"]
    assert db["tv_at_eval_level"]["mean"] == pytest.approx(0.5 + (0.8 - 0.4) / 0.6 * (0.1 - 0.5))  # interpolated
    assert db["split_tv_at_eval_level"]["mean"] == pytest.approx(db["tv_at_eval_level"]["mean"] / 2)
    assert db["modes_kept"] == 6 and s["algorithms"]["grpo"]["modes_kept"] == 3
    assert s["algorithms"]["ddpo"]["runs_reaching_level"] == 0
    assert compare.summarize(runs, "ddpo")["level"] == pytest.approx(0.5)
    text = compare.table(s)
    assert "trajectories to grpo's final level" in text and "| 6/6 |" in text and "| 3/6 |" in text
    lines = text.splitlines()
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_base_modes_samples_once_and_computes_targets(compare, tmp_path) -> None:
    overrides = ["sampling.steps=2"]
    record = compare.base_modes(ROOT / compare.PRESETS["modes"], overrides, 4, tmp_path)
    assert record["latent_dims"] == 4 * 8 * 8 and record["beta_eff"] == 50.0 * 256
    assert record["rewarded"] == ["black", "white"]
    for prompt, shares in record["shares"].items():
        assert sum(record["counts"][prompt].values()) == 4
        kept = {b: shares[b] for b in ("black", "white")}
        if sum(kept.values()):  # β_eff = 12,800: the base restricted to the rewarded backgrounds
            expected = {b: kept.get(b, 0.0) / sum(kept.values()) for b in shares}
            assert record["targets"][prompt] == pytest.approx(expected)
    again = compare.base_modes(ROOT / compare.PRESETS["modes"], [*overrides, "dag.beta=0.01"], 4, tmp_path)
    assert again["seconds"] == record["seconds"]  # read from the cache, not sampled again
    assert again["beta_eff"] == pytest.approx(2.56)  # targets follow this run's β, not the cached run's
    assert "targets" not in json.loads((tmp_path / "modes-base-tiny.json").read_text())


def test_cached_base_shares_name_the_weights_they_came_from(compare, tmp_path) -> None:
    """A model retrained under the same name must not reuse the old model's shares."""
    from dagcli.builtin import TINY_SD_DIR

    fingerprint = compare.weights_fingerprint("tiny")
    assert len(fingerprint) == 16 and compare.weights_fingerprint(str(TINY_SD_DIR)) == fingerprint
    assert compare.weights_fingerprint("org/some-hub-model") is None
    copy = tmp_path / "copy"
    for path in TINY_SD_DIR.rglob("*.safetensors"):
        (copy / path.relative_to(TINY_SD_DIR)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(TINY_SD_DIR)).write_bytes(path.read_bytes())
    assert compare.weights_fingerprint(str(copy)) == fingerprint
    changed = next(copy.rglob("*.safetensors"))
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
    assert compare.weights_fingerprint(str(copy)) != fingerprint
    for name in ("tiny", "tiny-flow"):  # the committed shares are the shipped models'
        committed = json.loads((ROOT / "benchmarks" / "results" / f"modes-base-{name}.json").read_text())
        assert committed["key"]["weights"] == compare.weights_fingerprint(name), name


def test_run_one_with_grpo_reports_mode_metrics(compare, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    overrides = ["sampling.batch_size=2", "sampling.batches_per_epoch=1", "sampling.steps=2", "train.batch_size=2",
                 f'sampling.prompts="{prompts}"', "grpo.group_size=2"]
    targets = {"targets": {"a red circle": {"black": 0.5, "white": 0.5, "gray": 0.0, "brown": 0.0}},
               "rewarded": ["black", "white"]}
    run = compare.run_one(ROOT / compare.PRESETS["modes"], "grpo", 0, 1, tmp_path, 4, overrides, eval_every=1,
                          threads=1, mode_targets=targets)
    for point in run["evals"]:
        assert 0.0 <= point["tv"] <= 1.0 and 0 <= point["modes_kept"] <= point["modes_possible"] == 2
        assert sum(point["shares"].values()) == pytest.approx(1.0)
        assert point["per_prompt_shares"]["a red circle"] == point["shares"]  # one prompt
        assert 0.0 <= point["split_tv"] <= 1.0
        # the reward is 1 exactly for the rewarded backgrounds: its mean is their share
        assert point["eval_reward"] == pytest.approx(point["shares"]["black"] + point["shares"]["white"])


def test_merge_summarises_runs_of_several_files(compare, tmp_path) -> None:
    def result(algo, final):
        curve = [{"trajectories": 32 * (i + 1), "reward": -1.0 + (final + 1.0) * i / 3} for i in range(4)]
        evals = [{"epoch": 0, "trajectories": 0, "eval_reward": -1.0, "diversity": 0.1},
                 {"epoch": 4, "trajectories": 128, "eval_reward": final, "diversity": 0.08}]
        run = {"algorithm": algo, "seed": 0, "curve": curve, "evals": evals, "eval_reward": final,
               "diversity": 0.08, "fidelity": 1.0, "train_seconds": 2.0}
        return {"reward": "compressibility", "wall_seconds": 2.0, "runs": [run]}

    files = []
    for algo, final in (("dag-db", -0.9), ("ddpo", -0.95)):
        files.append(tmp_path / f"{algo}.json")
        files[-1].write_text(json.dumps(result(algo, final)))
    merged = compare.merge(files, tmp_path, "both")
    assert (tmp_path / "compare-compressibility-both.png").stat().st_size > 0
    assert [r["algorithm"] for r in merged["runs"]] == ["dag-db", "ddpo"]
    level = merged["summary"]["level"]  # DDPO's last-3-epoch mean
    assert level == pytest.approx((-1.0 + 0.05 / 3 - 1.0 + 0.1 / 3 - 0.95) / 3)
    assert merged["summary"]["algorithms"]["dag-db"]["runs_reaching_level"] == 1
    assert merged["summary"]["reference"] == "ddpo"
    # FILE:ALGO keeps only those runs of a file: here DDPO's runs of a file holding DAG-DB's and DDPO's
    both = tmp_path / "both.json"
    both.write_text(json.dumps({**result("ddpo", -0.95), "runs": [result(a, -0.9)["runs"][0] for a in ("dag-db", "ddpo")]}))
    only = compare.merge([f"{both}:ddpo", files[0]], tmp_path, "filtered")
    assert [r["algorithm"] for r in only["runs"]] == ["ddpo", "dag-db"]
    assert compare.merge_source(f"{both}:nope") == (Path(f"{both}:nope"), None)  # not algorithm names: a path


def test_run_one_evaluates_along_training(compare, tmp_path) -> None:
    torch.manual_seed(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    overrides = ["sampling.batch_size=2", "sampling.batches_per_epoch=1", "sampling.steps=2", "train.batch_size=2",
                 f'sampling.prompts="{prompts}"', 'reward.spec="colorfulness"',
                 "output.checkpoint_every=1"]  # a checkpoint per epoch, to evaluate independently below
    before = torch.get_num_threads()
    run = compare.run_one(ROOT / compare.PRESETS["compressibility"], "ddpo", 0, 2, tmp_path, 2, overrides,
                          eval_every=1, threads=1)
    assert torch.get_num_threads() == before  # the caller's thread count is restored
    assert [p["epoch"] for p in run["evals"]] == [0, 1, 2]
    assert [p["trajectories"] for p in run["evals"]] == [0, 2, 4]
    assert [p["trajectories"] for p in run["curve"]] == [2, 4]
    assert all(math.isfinite(p["eval_reward"]) and p["diversity"] >= 0 for p in run["evals"])
    # each point scores the model as it was then: the base model, then the checkpoints saved after epochs 1, 2
    rewards = [p["eval_reward"] for p in run["evals"]]
    by_hand = [eval_reward_by_hand(tmp_path / "ddpo-s0", step, ["a blue square", "a red circle"]) for step in (0, 1, 2)]
    assert rewards == pytest.approx(by_hand, rel=1e-5)
    assert run["eval_reward"] == pytest.approx(by_hand[-1], rel=1e-5)


def test_run_one_refuses_a_run_stopped_by_a_signal(compare, tmp_path, monkeypatch) -> None:
    """A run whose trainer stops early (a signal to its worker) is not evaluated at epochs it never reached."""
    from dagcli.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    overrides = ["sampling.batch_size=2", "sampling.batches_per_epoch=1", "sampling.steps=2", "train.batch_size=2",
                 f'sampling.prompts="{prompts}"', 'reward.spec="colorfulness"']
    real = Trainer.train

    def one_epoch_then_stop(self, until_epoch=None):  # as a SIGTERM after the first epoch's save does
        state = real(self, until_epoch=min(until_epoch, 1))
        self.stopped = True
        return state

    monkeypatch.setattr(Trainer, "train", one_epoch_then_stop)
    with pytest.raises(SystemExit, match=r"ddpo \(seed 0\) stopped at epoch 1 of 3"):
        compare.run_one(ROOT / compare.PRESETS["compressibility"], "ddpo", 0, 3, tmp_path, 2, overrides,
                        eval_every=2, threads=1)


def eval_reward_by_hand(run_dir: Path, step: int, prompts: list[str]) -> float:
    """Mean colourfulness of 2 images per prompt with the evaluation's seeds, from the built-in model with the
    LoRA saved at `step` (none for 0) loaded as a user would, scored with numpy."""
    from dagcli.checkpoint import attach_lora
    from dagcli.models import load_model
    from dagcli.sampling import generators_for, sample_batch

    model = load_model("tiny", device="cpu")
    if step:
        attach_lora(model.pipe, run_dir / "checkpoints" / f"step-{step:06d}")
    rows = [p for p in prompts for _ in range(2)]
    seeds = [10_000_000 + i for i in range(len(rows))]  # the evaluation's held-out seeds for run seed 0
    with torch.no_grad():
        images = sample_batch(model, rows, generators_for(seeds), steps=2, guidance=3.0, eta=1.0).images
    x = images.double().clamp(0, 1).numpy() * 255
    rg, yb = x[:, 0] - x[:, 1], 0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]  # Hasler-Suesstrunk colourfulness
    m = np.hypot(rg.std((1, 2)), yb.std((1, 2))) + 0.3 * np.hypot(rg.mean((1, 2)), yb.mean((1, 2)))
    return float(m.mean())


def test_merge_refuses_files_of_different_rewards(compare, tmp_path) -> None:
    files = []
    for reward in ("clip", "compressibility"):
        files.append(tmp_path / f"{reward}.json")
        files[-1].write_text(json.dumps({"reward": reward, "wall_seconds": 1.0, "runs": []}))
    with pytest.raises(ValueError, match="different rewards"):
        compare.merge(files, tmp_path, "x")
    assert not list(tmp_path.glob("compare-*"))  # nothing written


EXACT_PRESETS = {"tiny": "examples/configs/tiny-modes-exact-target.toml",
                 "tiny-flow": "examples/configs/tiny-flow-modes-exact-target.toml"}


@pytest.mark.parametrize("model", sorted(EXACT_PRESETS))
def test_exact_presets_give_every_algorithm_the_same_target(compare, model) -> None:
    """β_eff = ln 4 for DAG's β and for rtb's own, under reduction "mean" over D = 256, and rtb's learned log Z is
    read in units of 1/D."""
    preset = ROOT / EXACT_PRESETS[model]
    assert compare.MODEL_PRESETS.get(model, compare.PRESETS)["modes-exact"] == EXACT_PRESETS[model]
    base = {"latent_dims": 256, "shares": {"a": {"black": 0.25, "gray": 0.25, "white": 0.25, "brown": 0.25}},
            "values": {"black": 1.0, "gray": 0.0, "white": 1.0, "brown": 0.0}, "rewarded": ["black", "white"]}
    for algo in ("dag-db", "dag-rdb", "rtb", "rtb-vargrad"):
        cfg = compare.run_config(preset, algo, 0, 1, [])
        target = compare.exact_targets(base, cfg)
        assert target["beta_eff"] == pytest.approx(math.log(4), rel=1e-6), algo
        assert target["log_z_scale"] == 256
        # 4^r over uniform base shares: Z = 0.5·4 + 0.5 = 2.5, p*(black) = 0.25·4 / 2.5
        assert target["targets"]["a"]["black"] == pytest.approx(0.4, rel=1e-6)
    assert compare.run_config(preset, "rtb-vargrad", 0, 1, []).rtb.log_z == "vargrad"
    assert compare.run_config(preset, "rtb", 0, 1, []).rtb.log_z == "learned"


def hand_target():
    base = {"a": {"black": 0.25, "gray": 0.25, "white": 0.25, "brown": 0.25},
            "b": {"black": 0.1, "gray": 0.4, "white": 0.3, "brown": 0.2}}
    values = {"black": 1.0, "gray": 0.0, "white": 1.0, "brown": 0.0}
    beta_eff = math.log(4)
    # by hand: a: Z = 2.5, p* = .4/.1/.4/.1, E[r] = .8; b: Z = .4·4 + .6 = 2.2, p* = .4/2.2, .4/2.2, 1.2/2.2, .2/2.2
    p_star = {"a": {"black": 0.4, "gray": 0.1, "white": 0.4, "brown": 0.1},
              "b": {"black": 0.4 / 2.2, "gray": 0.4 / 2.2, "white": 1.2 / 2.2, "brown": 0.2 / 2.2}}
    mode_targets = {"targets": p_star, "rewarded": ["black", "white"], "base": base, "values": values,
                    "beta_eff": beta_eff, "log_z_scale": 256}
    return mode_targets, {"a": math.log(2.5), "b": math.log(2.2)}, {"a": 0.8, "b": 1.6 / 2.2}


def test_exact_metrics_match_the_target_by_hand(compare) -> None:
    mode_targets, _, expected = hand_target()
    shares = {"a": {"black": 0.6, "gray": 0.1, "white": 0.3, "brown": 0.0},
              "b": {"black": 0.0, "gray": 0.5, "white": 0.5, "brown": 0.0}}
    got = compare.exact_metrics(shares, mode_targets)
    tv = {"a": 0.5 * (0.2 + 0.0 + 0.1 + 0.1),
          "b": 0.5 * (0.4 / 2.2 + abs(0.5 - 0.4 / 2.2) + abs(0.5 - 1.2 / 2.2) + 0.2 / 2.2)}
    gap = {"a": 0.9 - expected["a"], "b": 0.5 - expected["b"]}
    for p in ("a", "b"):
        assert got["per_prompt_exact"][p]["tv"] == pytest.approx(tv[p])
        assert got["per_prompt_exact"][p]["reward_gap"] == pytest.approx(gap[p])
        assert got["per_prompt_exact"][p]["expected_reward"] == pytest.approx(expected[p])
    assert got["tv_exact"] == pytest.approx((tv["a"] + tv["b"]) / 2)
    assert got["reward_gap"] == pytest.approx((gap["a"] + gap["b"]) / 2)
    assert got["split"]["black"] == pytest.approx((0.6 / 0.9 + 0.0) / 2)
    assert got["target_split"]["black"] == pytest.approx((0.5 + 0.25) / 2)  # b: 0.4 / (0.4 + 1.2)
    # the plain mode metrics read the same TV from the same p*
    labels = {"a": ["black"] * 6 + ["gray"] + ["white"] * 3, "b": ["gray"] * 5 + ["white"] * 5}
    images_rows = compare.modes.mode_report(labels, mode_targets["targets"], mode_targets["rewarded"])
    assert images_rows["tv"] == pytest.approx(got["tv_exact"])


def test_learned_log_z_in_nats_of_a_trajectory(compare) -> None:
    from types import SimpleNamespace

    from dagcli.algorithms.rtb import LogZTable

    mode_targets, true, _ = hand_target()
    table = LogZTable(["b", "a"])
    with torch.no_grad():
        table.log_z.copy_(torch.tensor([0.003, 0.004]))
    got = compare.learned_log_z(SimpleNamespace(algorithm=SimpleNamespace(table=table)), mode_targets)
    assert got["log_z_learned"] == pytest.approx({"b": 0.003 * 256, "a": 0.004 * 256}, rel=1e-6)
    assert got["log_z_true"] == pytest.approx(true)
    assert got["log_z_error"] == pytest.approx((abs(0.768 - math.log(2.2)) + abs(1.024 - math.log(2.5))) / 2,
                                               rel=1e-5)
    assert compare.learned_log_z(SimpleNamespace(algorithm=SimpleNamespace()), mode_targets) == {}  # no table


def test_sampling_floor_of_one_sample_is_one_minus_the_collision_probability(compare) -> None:
    """One sample b of p* reads TV 1 − p*(b): its mean over draws is 1 − Σ p*²."""
    mode_targets, _, _ = hand_target()
    base = {"shares": mode_targets["base"]}
    by_hand = sum(1 - sum(v * v for v in p.values()) for p in mode_targets["targets"].values()) / 2
    assert compare.sampling_floor(base, mode_targets, 1, draws=4000) == pytest.approx(by_hand, abs=0.02)
    assert compare.sampling_floor(base, mode_targets, 400) < 0.05


def test_run_one_with_rtb_reports_the_exact_target(compare, tmp_path) -> None:
    """One epoch of rtb (learned log Z) on the tiny model: the evaluation's TV / gap follow its shares, and its
    learned log Z is the saved table's, times D."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    # 8 trajectories: some rewarded (a zero-LoRA residual is −β·r, so without one log Z gets no gradient)
    overrides = ["sampling.batch_size=8", "sampling.batches_per_epoch=1", "sampling.steps=2", "train.batch_size=8",
                 f'sampling.prompts="{prompts}"', "output.checkpoint_every=1"]
    mode_targets, _, _ = hand_target()
    base = {"latent_dims": 256, "shares": {"a red circle": mode_targets["base"]["b"]},
            "values": mode_targets["values"], "rewarded": ["black", "white"]}
    preset = ROOT / EXACT_PRESETS["tiny"]
    targets = compare.exact_targets(base, compare.run_config(preset, "rtb", 0, 1, overrides))
    run = compare.run_one(preset, "rtb", 0, 1, tmp_path, 4, overrides, eval_every=1, threads=1,
                          mode_targets=targets, final_eval_per_prompt=6)
    assert [p["per_prompt"] for p in run["evals"]] == [4, 6]
    for point in run["evals"]:
        share = point["per_prompt_shares"]["a red circle"]
        assert point["tv_exact"] == pytest.approx(point["tv"])
        assert point["tv"] == pytest.approx(compare.modes.tv_distance(share, targets["targets"]["a red circle"]))
        assert point["reward_gap"] == pytest.approx(point["eval_reward"] - 1.6 / 2.2)
        assert point["log_z_true"] == {"a red circle": pytest.approx(math.log(2.2))}
    assert run["evals"][0]["log_z_learned"] == {"a red circle": 0.0}  # the table starts at 0
    saved = load_file(next((tmp_path / "rtb-s0" / "checkpoints").glob("step-*")) / "log_z.safetensors")
    (value,) = [float(v) for v in saved.values()]
    assert value != 0.0 and run["log_z_learned"]["a red circle"] == pytest.approx(value * 256, rel=1e-6)
    assert "log_z" in run["curve"][0] and "log_ratio_base" in run["curve"][0]


SIGTERM_SCRIPT = """
import importlib.util, multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("compare_algorithms", sys.argv[1])
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool, \\
            compare.workers_stop_with_us(pool):
        futures = [pool.submit(time.sleep, 120) for _ in range(3)]
        while not all(f.running() for f in futures[:2]):
            time.sleep(0.1)
        print(" ".join(str(p) for p in pool._processes), flush=True)
        futures[0].result()
"""


def test_a_sigterm_to_the_comparison_ends_its_worker_processes(tmp_path) -> None:
    """Without `workers_stop_with_us` the two sleeping workers outlive their parent by two minutes."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "pool.py"
    script.write_text(SIGTERM_SCRIPT)
    child = subprocess.Popen([sys.executable, script, ROOT / "benchmarks" / "compare_algorithms.py"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [int(p) for p in child.stdout.readline().split()]
    assert len(workers) == 2 and all(_running(p) for p in workers), child.stderr.read()[-2000:]
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err[-2000:]
    deadline, alive = time.monotonic() + 10, workers
    while alive and time.monotonic() < deadline:
        alive = [p for p in workers if _running(p)]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived the comparison"


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
