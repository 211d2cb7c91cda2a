"""The benchmark scripts: real model shapes, the memory-fit table, perf.py's epoch and decoder measures, gpu.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_shapes  # noqa: E402
import perf  # noqa: E402


@pytest.fixture(autouse=True)
def torch_threads():
    """The benchmarks set torch's thread count (`--threads`); later tests must see the suite's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def total_size(module: torch.nn.Module) -> int:
    """Parameters and buffers: what a checkpoint file holds."""
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def test_shapes_match_the_published_models():
    """Built on the meta device at full depth; sizes from the published checkpoints: SDXL base's UNet (2,567,463,684
    parameters), FLUX.1-dev's transformer (11,901,408,320), SD3.5 Medium's transformer file (4.94 GB in bf16: its
    parameters and its 384x384 position table)."""
    with torch.device("meta"):
        sdxl, sd35, flux = (gpu_shapes.BUILDERS[n](None) for n in ("sdxl", "sd35_medium", "flux_dev"))
    assert gpu_shapes.parameters(sdxl.unet) == 2_567_463_684
    assert gpu_shapes.parameters(flux.transformer) == 11_901_408_320
    assert round(total_size(sd35.transformer) * 2 / 1e9, 2) == 4.94
    assert len(sd35.transformer.config.dual_attention_layers) == 13
    assert sd35.transformer.config.num_attention_heads * sd35.transformer.config.attention_head_dim == 1536
    assert flux.transformer.config.num_attention_heads * flux.transformer.config.attention_head_dim == 3072
    assert (sd35.vae.config.latent_channels, flux.vae.config.latent_channels, sdxl.vae.config.latent_channels) == (16, 16, 4)


def test_fewer_layers_keep_the_widths():
    with torch.device("meta"):
        sd35, flux = gpu_shapes.build_sd35_medium(2), gpu_shapes.build_flux_dev((1, 2))
    assert (sd35.transformer.config.num_layers, sd35.transformer.config.caption_projection_dim) == (2, 1536)
    assert len(flux.transformer.transformer_blocks) == 1 and len(flux.transformer.single_transformer_blocks) == 2
    assert flux.transformer.x_embedder.out_features == 3072


@pytest.mark.parametrize(("reserved_gib", "skipped", "expected"), [
    (22.0, None, ["yes", "yes", "yes"]),  # 22 + 1 GiB context <= 23.5
    (23.0, None, ["no", "yes", "yes"]),  # 24 > 23.5
    (44.0, None, ["no", "no", "yes"]),  # 45 > 44.5
    (79.0, None, ["no", "no", "no"]),
    (None, "out of memory: CUDA out of memory", ["no (out of memory here)"] * 3),
    (None, None, ["n/a (CPU)"] * 3),
])
def test_fits(reserved_gib, skipped, expected):
    row = {"micro_batch": 1, "gradient_checkpointing": False}
    if reserved_gib is not None:
        row["peak_cuda_reserved_mib"] = reserved_gib * 1024
    if skipped:
        row["skipped"] = skipped
    assert gpu_shapes.fits(row) == expected


def test_every_state_switch_restores_the_rollout(tmp_path):
    import dagcli.rollout as rollout
    from dagcli.config import Config

    class Holder:
        config = Config()

    pairs = torch.tensor([[0, 1]])
    before = rollout.states_needed
    with perf.timestep_fraction(Holder, 0.5, every_state=True):
        assert Holder.config.train.timestep_fraction == 0.5
        assert rollout.states_needed(pairs, 2, 3).all()
    assert rollout.states_needed is before and Holder.config.train.timestep_fraction == 1.0
    with perf.timestep_fraction(Holder, 0.5):  # only the states the pair touches: (0, 1) and (0, 2)
        assert rollout.states_needed(pairs, 2, 3).nonzero().tolist() == [[0, 1], [0, 2]]


def test_random_tiny_decoder_loads_like_a_real_one():
    from dagcli.models import load_tiny_decoder

    folder = perf.random_tiny_decoder(4)
    decoder = load_tiny_decoder(folder, torch.device("cpu"), torch.float32)
    assert (Path(folder) / "diffusion_pytorch_model.safetensors").is_file()
    with torch.no_grad():
        images = decoder.decode(torch.zeros(1, 4, 8, 8), return_dict=False)[0]
    assert images.shape == (1, 3, 64, 64)  # TAESD upsamples 8x


def test_perf_training_measures_fractions_and_the_small_decoder(tmp_path):
    out = tmp_path / "perf.json"
    perf.main(["--quick", "--sections", "training", "--batch", "2", "--steps", "4", "--train-batches", "2",
               "--repeats", "1", "--epoch-repeats", "1", "--threads", "1", "--out", str(out)])
    tr = json.loads(out.read_text())["sections"]["training"]
    full, half = tr["epochs_by_fraction"]["1.0"], tr["epochs_by_fraction"]["0.5"]
    assert (full["transitions_trained"], half["transitions_trained"]) == (2 * 4, 2 * 2)  # batch 2, 4 steps
    assert set(full["seconds"]) == {"sampling", "current"}
    assert set(half["seconds"]) == {"sampling", "current", "sampling_every_state"}
    assert half["ratio_sampling_vs_current"] == pytest.approx(half["seconds"]["current"] / half["seconds"]["sampling"],
                                                              abs=1e-4)
    small = tr["per_transition"]["small_decoder"]
    assert small["speedup_fl_vs_vae"] > 0 and tr["epochs_small_decoder"]["timestep_fraction"] == 1.0
    assert "fraction 0.5: speed-up of decoding only the trained states" in json.loads(out.read_text())["table"]


def test_gpu_shapes_tiny_run_writes_ratios_and_tables(tmp_path):
    out = tmp_path / "shapes.json"
    gpu_shapes.main(["--tiny", "--models", "tiny-random-flux", "--micro-batches", "1", "--threads", "1",
                     "--out", str(out)])
    res = json.loads(out.read_text())["sections"]["tiny-random-flux"]
    sp, pt = res["sampling"], res["training"]["per_transition"]
    assert sp["guided_batch"] == 2  # FLUX is guidance-distilled: no [uncond; cond] doubling
    assert sp["ratio_ours_vs_pipeline_images_per_s"] == pytest.approx(
        sp["images_per_s"]["ours"] / sp["images_per_s"]["pipeline"], rel=1e-3)
    assert pt["ratio_ours_vs_guided_fwd_bwd"] >= pt["ratio_ours_vs_guided_fwd_bwd_without_fl"] > 0
    assert [(r["micro_batch"], r["gradient_checkpointing"]) for r in res["training"]["sweep"]] == [(1, False), (1, True)]
    md = out.with_suffix(".md").read_text()
    assert "| tiny-random-flux | all | 32 | 2 | 2 |" in md and "n/a (CPU)" in md


@pytest.mark.slow
def test_gpu_sh_tiny_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for name in ("gpu-sd15.json", "gpu-sd15.md", "gpu-shapes.json", "gpu-shapes.md", "gpu.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    shapes = json.loads((tmp_path / "gpu-shapes.json").read_text())["sections"]
    assert set(shapes) == set(gpu_shapes.TINY) and all("sampling" in r for r in shapes.values())


def test_perf_algorithms_times_each_algorithm_against_its_baseline(tmp_path):
    out = tmp_path / "perf.json"
    perf.main(["--quick", "--sections", "algorithms", "--batch", "2", "--steps", "3", "--train-batches", "2",
               "--epoch-repeats", "1", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    al = result["sections"]["algorithms"]
    assert set(al) >= {"dag-db", "dag-rdb", "grpo", "rtb", "nft"}
    seen = set()
    for name, base in perf.ALGORITHM_RATIOS:
        key = f"{name.replace('-', '_')}_over_{base.replace('-', '_')}"
        for part in ("collect", "train", "epoch"):
            if base not in seen:  # a baseline's recorded times are those of its first pair
                assert al[key][part] == pytest.approx(al[name][part] / al[base][part], rel=3e-2, abs=1e-3)
            assert al[key][part] > 0
        seen |= {name, base}
        assert f"{name} / {base}: epoch (per trajectory)" in result["table"]


def test_perf_algorithms_times_only_the_pairs_asked_for(tmp_path, capsys):
    out = tmp_path / "perf.json"
    args = ["--quick", "--sections", "algorithms", "--batch", "2", "--steps", "3", "--train-batches", "2",
            "--epoch-repeats", "1", "--threads", "1", "--out", str(out)]
    perf.main([*args, "--pairs", "rtb-flow-expected"])
    al = json.loads(out.read_text())["sections"]["algorithms"]
    timed = {k for k in al if isinstance(al[k], dict) and "epoch" in al[k]}
    assert timed == {"grpo", "rtb-flow-expected", "rtb_flow_expected_over_grpo"}
    with pytest.raises(SystemExit) as stop:
        perf.main([*args, "--pairs", "rtb-flow"])
    assert stop.value.code == 2
    assert "--pairs 'rtb-flow': valid: dag-rdb, rtb, rtb-x0-expected" in capsys.readouterr().err


@pytest.mark.parametrize("learning_rate, moved", [(1e-12, False), (3e-2, True)])
def test_log_ratio_steps_is_zero_for_the_base_model_and_sums_per_step(learning_rate, moved, tmp_path,
                                                                      tiny_pipeline_dir, capsys):
    """A LoRA that has hardly left zero scores every step as the base model does (ρ = 0); a trained one does not,
    and the per-step means add up to the path's."""
    import log_ratio_steps

    from helpers.cli import run_cli, write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], train={"algorithm": "rtb",
                            "learning_rate": learning_rate}, rtb={"log_z": "learned", "group_size": 1})
    run = tmp_path / "run"
    assert run_cli(["train", "--config", cfg, "--epochs", "2", "-o", run], capsys)[0] == 0
    out = tmp_path / "steps.json"
    log_ratio_steps.main([str(run), "--output", str(out)])
    r = json.loads(out.read_text())["runs"][0]
    assert (r["trajectories"], len(r["log_ratio_mean"]), r["latent_dims"]) == (3, 4, 4 * 8 * 8)
    assert sum(r["log_ratio_mean"]) == pytest.approx(r["path_log_ratio_mean"], rel=1e-4, abs=1e-4)
    if moved:
        assert max(abs(v) for v in r["log_ratio_mean"]) > 1e-2 and r["path_log_ratio_mean"] > 0  # KL ≥ 0
    else:
        assert max(abs(v) for v in r["log_ratio_mean"]) < 1e-3 and max(r["mean_shift_in_sigma"]) < 1e-3
    if moved:  # the split by decided states: every stochastic step the LoRA samples, every state in one group
        log_ratio_steps.main([str(run), "--output", str(out), "--continuations", "2"])
        split = json.loads(out.read_text())["runs"][0]["decided_split"]
        assert [g["step"] for g in split] == [0, 1, 2, 3][: len(split)] and len(split) >= 3
        assert all(g["states_open"] + g["states_decided"] == 3 for g in split)
        assert "base continuations disagree (open) or agree (decided)" in capsys.readouterr().out


def test_decided_split_by_hand():
    import log_ratio_steps

    shift = torch.tensor([1.0, 2.0, 3.0, 5.0])
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # rows 1 and 3 are still open
    assert log_ratio_steps.decided_split(shift, rewards) == {"shift_open": 3.5, "shift_decided": 2.0,
                                                             "states_open": 2, "states_decided": 2}
    assert log_ratio_steps.decided_split(shift[:1], rewards[:1])["shift_open"] is None
    with pytest.raises(SystemExit) as e:
        log_ratio_steps.main(["nowhere", "--continuations", "1"])
    assert e.value.code == 2


def test_reward_decided_by_hand():
    """The share of the reward's variance a state decides and the tail's bias, on rewards [states, continuations]
    by hand: decided states give share 1 and no bias; undecided ones give share 0 and log((e^β + 1)/2) − β/2."""
    import math

    import reward_decided

    decided, open_ = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert reward_decided.decided_share(decided) == 1.0 and reward_decided.jensen_gap(decided, 2.0) == 0.0
    assert reward_decided.decided_share(open_) == 0.0
    assert reward_decided.jensen_gap(open_, 2.0) == pytest.approx(math.log((math.e ** 2 + 1) / 2) - 1.0)
    # half decided: states' means 1 and 0.5 against the pooled variance of (1, 1, 1, 0): 1 − (0 + 0.25)/2 / 0.1875
    assert reward_decided.decided_share(torch.tensor([[1.0, 1.0], [1.0, 0.0]])) == pytest.approx(1 - 0.125 / 0.1875)
    rows = [{"state": m, "decided": d} for m, d in enumerate([0.3, 0.9, 0.995, 1.0, 1.0])]
    assert reward_decided.longest_tail(rows, steps=4, level=0.99) == 2  # x_2 decides: steps 2 and 3 can be the base's


def test_reward_decided_on_tiny(tmp_path, tiny_pipeline_dir):
    """On a 4-step tiny chain the final state decides its reward exactly; the pure noise does not."""
    import reward_decided

    from helpers.cli import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"])
    out = tmp_path / "decided.json"
    reward_decided.main(["--config", str(cfg), "--per-prompt", "3", "--continuations", "2", "--output", str(out)])
    r = json.loads(out.read_text())
    states = {s["state"]: s for s in r["states"]}
    assert sorted(states) == [0, 1, 2, 3, 4] and r["prompts"] == ["a red circle", "a blue square"]
    assert states[4]["decided"] == 1.0 and states[4]["jensen_gap_nats"] == 0.0
    assert states[0]["decided"] < 1.0 and states[0]["jensen_gap_nats"] > 0.0


def test_reachable_target_by_hand():
    """Two starts, backgrounds (rewarded, unrewarded), tilt e^β = 4. Undecided starts (both 1:1): h = 2.5 at each,
    so p_reach = p* = (0.8, 0.2). Decided starts (one all rewarded, one all unrewarded): h = 4 and 1, nothing
    can move, p_reach = base = (0.5, 0.5) while p* = (0.8, 0.2); min KL = log 2.5 − (log 4 + log 1)/2."""
    import math

    import reachable_target

    values, beta = torch.tensor([1.0, 0.0], dtype=torch.float64), math.log(4.0)
    open_ = reachable_target.reachable(torch.tensor([[2.0, 2.0], [1.0, 1.0]]), values, beta)
    assert open_["p_reach"] == pytest.approx([0.8, 0.2]) and open_["p_star"] == pytest.approx([0.8, 0.2])
    assert open_["tv_reach_to_target"] == pytest.approx(0.0, abs=1e-12)
    assert open_["log_z"] == pytest.approx(math.log(2.5)) and open_["mean_log_h"] == pytest.approx(math.log(2.5))
    decided = reachable_target.reachable(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), values, beta)
    assert decided["p_reach"] == pytest.approx([0.5, 0.5]) and decided["p_star"] == pytest.approx([0.8, 0.2])
    assert decided["tv_reach_to_target"] == pytest.approx(0.3) and decided["reward_reach"] == pytest.approx(0.5)
    assert decided["log_z"] - decided["mean_log_h"] == pytest.approx(math.log(2.5) - math.log(4.0) / 2)
    # one start 3:1, one 1:3: h = 3.25 and 1.75; p_reach(rewarded) = (3/3.25 + 1/1.75) / 2
    mixed = reachable_target.reachable(torch.tensor([[3.0, 1.0], [1.0, 3.0]]), values, beta)
    assert mixed["p_reach"][0] == pytest.approx((3 / 3.25 + 1 / 1.75) / 2)
    assert reachable_target.debiased({"a": 1.0, "b": [1.0, 0.5], "c": "x"}, {"a": 0.5, "b": [0.0, 0.5], "c": "x"}) \
        == {"a_corrected": 1.5, "b_corrected": [2.0, 0.5]}


def test_reachable_target_on_tiny(tmp_path, tiny_pipeline_dir, capsys):
    """On a tiny chain with the modes reward: the shares are distributions, p_reach lies between the base model
    and p* in its reward, and the start's KL floor is not negative."""
    import reachable_target

    from helpers.cli import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], reward={"spec": "background-modes"},
                            dag={"beta": 0.01, "flow_learning_rate": 1e-2})
    out = tmp_path / "reach.json"
    reachable_target.main(["--config", str(cfg), "--starts", "3", "--continuations", "4", "--output", str(out)])
    r = json.loads(out.read_text())
    row = r["per_prompt"]["a red circle"]
    assert r["backgrounds"] == ["black", "gray", "white", "brown"] and r["starts"] == 3
    for key in ("base", "p_star", "p_reach"):
        assert sum(row[key]) == pytest.approx(1.0)
    assert row["reward_base"] - 1e-9 <= row["reward_reach"] <= row["reward_target"] + 1e-9
    assert row["log_z"] >= row["mean_log_h"] - 1e-12
    # a compare file whose last evaluation sits on p_reach reads 0 against it; its epoch 0 is the base row
    reach_shares = dict(zip(r["backgrounds"], row["p_reach_corrected"], strict=True))
    base_shares = dict(zip(r["backgrounds"], row["base"], strict=True))
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps({"model": "tiny", "runs": [{"algorithm": "rtb", "seed": 0, "evals": [
        {"epoch": 0, "eval_reward": 0.4, "tv_exact": 0.3, "per_prompt_shares": {"a red circle": base_shares}},
        {"epoch": 2, "eval_reward": 0.6, "tv_exact": 0.2, "per_prompt_shares": {"a red circle": reach_shares}}]}]}))
    base, last = reachable_target.against_runs(r, [compare])
    assert (base["epoch"], last["epoch"], last["tv_to_target"]) == (0, 2, 0.2)
    assert last["tv_to_reachable"] == pytest.approx(0.0, abs=1e-12)
    want = 0.5 * sum(abs(a - b) for a, b in zip(row["base"], row["p_reach_corrected"], strict=True))
    assert base["tv_to_reachable"] == pytest.approx(want)
    capsys.readouterr()
    reachable_target.main(["--against", str(compare), "--reach", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[-2] == f"{want:.3f}" and printed[2].split()[-4:] == ["0.600", "0.200", "0.000", "—"]


def test_kl_estimate_by_hand():
    """The last 4 epochs' Σρ (per dim × D under "mean") − β_eff·r, averaged, plus the prompts' mean log Z:
    D = 256, β_eff = ln 4, log Z 0.8 and 1.0; epochs (ρ/D, r) = (0.001, 0.5) ×2 and (0.002, 0.75) ×2 after an
    earlier epoch that is left out."""
    import math

    import reachable_target

    curve = [{"log_ratio_base": 9.0, "reward": 0.0}] + [{"log_ratio_base": 0.001, "reward": 0.5}] * 2 + [
        {"log_ratio_base": 0.002, "reward": 0.75}] * 2
    run = {"curve": curve, "evals": [{"per_prompt_exact": {"a": {"log_z": 0.8}, "b": {"log_z": 1.0}}}]}
    base = {"latent_dims": 256, "reduction": "mean", "beta_eff": math.log(4)}
    want = (0.256 + 0.512) / 2 - math.log(4) * 0.625 + 0.9
    assert reachable_target.kl_estimate(run, base) == pytest.approx(want)
    assert reachable_target.kl_estimate(run, {**base, "reduction": "sum"}) == pytest.approx(
        0.0015 - math.log(4) * 0.625 + 0.9)
    assert reachable_target.kl_estimate({"curve": [{"reward": 0.5}], "evals": run["evals"]}, base) is None
    # dag-rdb logs the mean ρ of a trained transition: Σρ is 5 of them on a chain that trains 5
    rdb = {**run, "algorithm": "dag-rdb"}
    assert reachable_target.kl_estimate(rdb, base) is None
    assert reachable_target.kl_estimate(rdb, base, transitions=5) == pytest.approx(
        5 * (0.256 + 0.512) / 2 - math.log(4) * 0.625 + 0.9)


def test_trained_transitions_of_a_dag_rdb_run_from_its_preset_and_overrides():
    import reachable_target

    result = {"preset": "examples/configs/tiny-flow-modes-exact-target.toml"}
    assert reachable_target.trained_transitions(result, {"overrides": []}) == 10
    assert reachable_target.trained_transitions(result, {"overrides": ["dag.tail_steps=5"]}) == 5
    assert reachable_target.trained_transitions(result, {"overrides": ["sampling.steps=8", "dag.tail_steps=2"]}) == 6


def test_gradient_snr_by_hand():
    """Two gradients (1, 0) and (3, 0): mean (2, 0), unbiased variance 2 on the first coordinate; the signal
    ‖ḡ‖² − tr Σ / N = 4 − 1 = 3; SNR 1 takes tr Σ / signal = 2/3 trajectories; the halves point the same way."""
    import gradient_snr

    out = gradient_snr.snr(torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    assert (out["mean_norm2"], out["variance_trace"], out["signal"]) == (4.0, 2.0, 3.0)
    assert out["trajectories_for_snr_1"] == pytest.approx(2 / 3) and out["half_cosine"] == pytest.approx(1.0)
    assert gradient_snr.snr(torch.tensor([[1.0], [-1.0]], dtype=torch.float64))["trajectories_for_snr_1"] is None


def test_gradient_snr_per_trajectory_gradients_add_up_to_the_epochs(tmp_path, tiny_pipeline_dir):
    """The per-trajectory gradients of an RTB epoch on tiny sum to the gradient of the whole epoch's loss."""
    import gradient_snr

    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer
    from helpers.cli import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], train={"algorithm": "rtb"},
                            rtb={"log_z": "vargrad", "group_size": 3, "beta": 1.0, "tail_steps": 1})
    trainer = Trainer(replace(load_config(cfg), "output", dir=str(tmp_path / "r")), ["a red circle"])
    batch, _ = trainer.collect(0)
    trainer.unit.before_micro_batches(trainer, batch, 0)
    grads = gradient_snr.per_trajectory_gradients(trainer, batch, 0)
    params = [p for p in trainer.raw_denoiser.parameters() if p.requires_grad]
    loss, _ = trainer.micro_batch_loss(batch, batch.pairs, 0)
    loss.sum().backward()
    whole = torch.cat([p.grad.flatten() for p in params]).double()
    assert grads.shape == (3, whole.numel()) and float(whole.abs().max()) > 0
    torch.testing.assert_close(grads.sum(0), whole, rtol=1e-3, atol=1e-4 * float(whole.abs().max()))


def test_gradient_snr_at_a_trained_checkpoint(tmp_path, tiny_pipeline_dir):
    """--resume measures with a run's trained LoRA: the same seeds then give another epoch and other gradients
    than at the base model, and the result names the checkpoint and its epoch."""
    import gradient_snr

    from dagcli.config import load_config
    from dagcli.trainer import Trainer
    from helpers.cli import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"],
                            train={"algorithm": "rtb", "epochs": 1, "learning_rate": 3e-2},
                            rtb={"log_z": "vargrad", "group_size": 3, "beta": 1.0, "tail_steps": 1},
                            output={"dir": str(tmp_path / "run")})
    Trainer(load_config(cfg), ["a red circle"]).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    base, trained = tmp_path / "base.json", tmp_path / "trained.json"
    gradient_snr.main(["--config", str(cfg), "--output", str(base)])
    gradient_snr.main(["--config", str(cfg), "--resume", str(checkpoint), "--output", str(trained)])
    b, t = json.loads(base.read_text()), json.loads(trained.read_text())
    assert (b["resumed_from"], b["epoch"]) == (None, 0) and (t["resumed_from"], t["epoch"]) == (str(checkpoint), 1)
    assert t["mean_norm2"] != b["mean_norm2"] and t["variance_trace"] != b["variance_trace"]
    by_run = tmp_path / "by-run.json"  # the run directory stands for its latest checkpoint
    gradient_snr.main(["--config", str(cfg), "--resume", str(tmp_path / "run"), "--output", str(by_run)])
    assert json.loads(by_run.read_text())["mean_norm2"] == t["mean_norm2"]


def test_shift_bound_by_hand(tmp_path, capsys):
    """Base share 1/2 (c = 0) at odds 4: p* has 4/5 of the mass on the rewarded side, and the best shift solves
    d = ln 4·φ(d), here by fixed-point iteration (a contraction: |ln 4·φ'| < 0.34), not the script's bisection."""
    import math

    import shift_bound

    beta = math.log(4)
    d = 0.0
    for _ in range(200):
        d = beta * math.exp(-d * d / 2) / math.sqrt(2 * math.pi)
    r = shift_bound.best_shift(0.5, beta)
    assert r["target"] == pytest.approx(0.8, abs=1e-12) and r["shift"] == pytest.approx(d, abs=1e-9)
    share = 0.5 * (1 + math.erf(d / math.sqrt(2)))
    assert r["share"] == pytest.approx(share, abs=1e-9) and r["gap"] == pytest.approx(share - 0.8, abs=1e-9)
    assert r["kl_to_base"] == pytest.approx(d * d / 2) and r["share"] < r["target"]

    def kl_to_target(x):  # the policy N(x, 1) against p*: x²/2 − β Φ(x) + log Z, Z = (1 + 4)/2
        return x * x / 2 - beta * 0.5 * (1 + math.erf(x / math.sqrt(2))) + math.log(2.5)
    assert r["kl_to_target"] == pytest.approx(kl_to_target(d))
    assert kl_to_target(d) < min(kl_to_target(d - 0.01), kl_to_target(d + 0.01))  # the best shift
    assert r["target_kl_to_base"] == pytest.approx(beta * 0.8 - math.log(2.5))  # KL(p* ‖ base) of the two sides
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"shares": {"a": {"black": 0.25, "white": 0.25, "gray": 0.5}, "b": {"gray": 0.9,
                                                                                               "white": 0.1}}}))
    out = shift_bound.main(["--base", str(base)])
    assert out["per_prompt"]["a"]["shift"] == pytest.approx(d, abs=1e-9) and out["per_prompt"]["b"]["base"] == 0.1
    assert out["mean_gap"] == pytest.approx((out["per_prompt"]["a"]["gap"] + out["per_prompt"]["b"]["gap"]) / 2)
    assert "mean reward gap at the shift bound" in capsys.readouterr().out
    for bad in (["--odds", "1"], ["--base", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit) as e:
            shift_bound.main(["--base", str(base), *bad])
        assert e.value.code == 2
    with pytest.raises(ValueError, match="base rewarded share"):
        shift_bound.best_shift(1.0, beta)
