"""An epoch's data: which transitions are trained, and forward-looking rewards only for the states they touch."""

from __future__ import annotations

import pytest
import torch

from dagcli.rollout import keep_pairs, select_transitions, states_needed
from helpers.cli import write_tiny_config


def test_states_needed_marks_both_ends_of_each_transition_but_the_final_state():
    pairs = torch.tensor([[0, 0], [1, 3], [2, 1]])  # 3 trajectories of 4 steps; (1, 3) ends in the final state
    needed = states_needed(pairs, n=3, steps=4)
    expected = torch.tensor([[1, 1, 0, 0],
                             [0, 0, 0, 1],
                             [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(needed, expected)


def test_keep_pairs_drops_and_renumbers():
    pairs = torch.tensor([[2, 0], [0, 1], [1, 2], [2, 3], [3, 1]])
    keep = torch.tensor([True, False, True, True])  # trajectory 1 dropped: 2 -> 1, 3 -> 2
    assert keep_pairs(pairs, keep).tolist() == [[1, 0], [0, 1], [1, 3], [2, 1]]


@pytest.mark.parametrize("fraction, per_trajectory", [(1.0, 6), (0.5, 3), (0.1, 1)])
def test_select_transitions_takes_a_fraction_of_each_trajectory(fraction, per_trajectory):
    pairs = select_transitions(seed=0, epoch=1, rank=0, n=5, steps=6, fraction=fraction, always_last=True)
    assert len(pairs) == 5 * per_trajectory
    for b in range(5):
        steps = sorted(pairs[pairs[:, 0] == b, 1].tolist())
        assert len(set(steps)) == per_trajectory and 5 in steps  # distinct, the final transition always in
    again = select_transitions(seed=0, epoch=1, rank=0, n=5, steps=6, fraction=fraction, always_last=True)
    assert torch.equal(pairs, again)  # seeded by (seed, epoch, rank)


def test_forward_looking_rewards_only_for_trained_states(tmp_path, tiny_pipeline_dir):
    """With half of each trajectory trained, only the states those transitions touch are decoded and scored,
    and their values equal the ones scored for every state."""
    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer

    cfg = load_config(write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"],
                                        sampling={"steps": 6}, train={"batch_size": 3},
                                        output={"dir": str(tmp_path / "run")}))
    scored: dict[float, int] = {}
    values = {}
    for fraction in (1.0, 0.5):
        trainer = Trainer(replace(cfg, "train", timestep_fraction=fraction), ["a red circle", "a blue square"])
        score = trainer.rollout.score

        def counting(images, prompts, fraction=fraction, score=score):
            scored[fraction] = scored.get(fraction, 0) + len(images)
            return score(images, prompts)

        trainer.rollout.score = counting
        batch, _ = trainer.collect(0)
        values[fraction] = (batch, states_needed(batch.pairs, 3, 6))
    full, (half, needed) = values[1.0][0], values[0.5]
    assert scored[1.0] == 3 + 3 * 6  # terminal images + every non-terminal state
    assert scored[0.5] == 3 + int(needed.sum()) < scored[1.0]
    assert torch.equal(half.fl_rewards[needed], full.fl_rewards[needed])
    assert torch.isnan(half.fl_rewards[~needed]).all() and torch.isfinite(full.fl_rewards).all()


def test_a_tiny_decoder_decodes_the_x0_images_and_only_them(tmp_path, tiny_pipeline_dir):
    """dag.x0_decoder: the forward-looking images come from the AutoencoderTiny (equal to decoding with it
    directly), the final images still from the model's VAE."""
    from diffusers import AutoencoderTiny

    from dagcli.config import load_config, replace
    from dagcli.families.base import decode_latents
    from dagcli.trainer import Trainer

    folder = tmp_path / "taesd"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).save_pretrained(folder)
    cfg = load_config(write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"],
                                        output={"dir": str(tmp_path / "run")}))
    batches = {}
    for decoder in ("", str(folder)):
        trainer = Trainer(replace(cfg, "dag", x0_decoder=decoder), ["a red circle", "a blue square"])
        batches[decoder], _ = trainer.collect(0)
    full, tiny = batches[""], batches[str(folder)]
    assert torch.equal(full.rewards, tiny.rewards)  # same trajectories, final images from the full VAE
    assert not torch.equal(full.fl_rewards, tiny.fl_rewards)
    traj, rollout = tiny.traj, trainer.rollout
    x0 = trainer.family.predict_x0(rollout.schedule, torch.tensor([2]), traj.latents[:1, 2], traj.out_cond[:1, 2])
    by_hand = rollout.score(decode_latents(rollout.x0_vae, x0), traj.prompts[:1])[0]
    assert torch.equal(by_hand, tiny.fl_rewards[:1, 2])


def test_a_missing_x0_decoder_is_refused_before_loading(tmp_path, tiny_pipeline_dir, capsys):
    from helpers.cli import run_cli

    config = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"])
    code, _, err = run_cli(["train", "--config", config, "-o", tmp_path / "run", "--set",
                            f'dag.x0_decoder="{tmp_path}"'], capsys)
    assert code == 2 and "has no config.json" in err and len(err.strip().splitlines()) == 1


def test_the_builtin_small_decoder_is_close_to_the_vae():
    """The shipped decoder of the built-in model's latents (`dag.x0_decoder = "tiny-taesd"`) decodes the VAE's
    own reconstructions of rendered shapes close to the VAE (mean absolute pixel error < 0.05 of the range)."""
    import numpy as np

    from dagcli.builtin import dataset
    from dagcli.families.base import decode_latents
    from dagcli.models import load_model, load_tiny_decoder

    model = load_model("tiny", device="cpu")
    tiny = load_tiny_decoder("tiny-taesd", model.device, model.dtype)
    vae = model.pipe.vae
    images = torch.from_numpy(dataset.render_array(dataset.sample_specs(16, seed=3)).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        latents = vae.encode(images.permute(0, 3, 1, 2)).latent_dist.mean * vae.config.scaling_factor
        a, b = decode_latents(vae, latents), decode_latents(tiny, latents)
    assert a.shape == b.shape == (16, 3, 32, 32)
    assert float((a - b).abs().mean()) < 0.05
