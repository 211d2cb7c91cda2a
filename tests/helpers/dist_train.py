"""Run under `torchrun --nproc_per_node 2`: train with a config and dump what each process saw and ended with.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/dist_train.py CONFIG DUMP_DIR

Writes DUMP_DIR/rank{R}.pt with the epochs' first latents (the initial noise), prompts and rewards, the final
LoRA and flow weights, and the number of processes. Two faults are injected to check that the processes stay
in step: rank 1's first terminal reward is NaN (its trajectory is dropped, so the ranks hold different numbers
of transitions) and rank 0's second micro-batch loss is NaN (the last one of an accumulation group, where DDP
all-reduces).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def instrument(trainer, record: list[dict]) -> None:
    """Wrap the trainer's collect / score / loss methods to record batches and inject the two faults."""
    rank = trainer.accelerator.process_index
    collect, score, loss_fn = trainer.collect, trainer.rollout.score, trainer.micro_batch_loss
    calls = {"score": 0, "loss": 0}

    def recording_collect(epoch):
        batch, timing = collect(epoch)
        record.append({"epoch": epoch, "noise": batch.traj.latents[:, 0].clone(), "prompts": list(batch.traj.prompts),
                       "rewards": batch.rewards.clone()})
        return batch, timing

    def faulty_score(images, prompts):
        scores, components = score(images, prompts)
        calls["score"] += 1
        if rank == 1 and calls["score"] == 1:
            scores = scores.clone()
            scores[0] = float("nan")
        return scores, components

    def faulty_loss(batch, idx, epoch):
        loss, logs = loss_fn(batch, idx, epoch)
        calls["loss"] += 1
        if rank == 0 and calls["loss"] == 2:
            loss = loss * float("nan")
        return loss, logs

    trainer.collect, trainer.rollout.score, trainer.micro_batch_loss = recording_collect, faulty_score, faulty_loss


def main(config: str, dump_dir: str) -> None:
    from peft import get_peft_model_state_dict

    from dagcli.config import load_config
    from dagcli.prompts import load_prompts
    from dagcli.trainer import Trainer

    cfg = load_config(Path(config))
    trainer = Trainer(cfg, [p.prompt for p in load_prompts(cfg.sampling.prompts)])
    record: list[dict] = []
    instrument(trainer, record)
    trainer.train()
    acc = trainer.accelerator
    torch.save({
        "world": acc.num_processes,
        "record": record,
        "lora": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(trainer.raw_denoiser).items()},
        "flow": {k: v.detach().cpu().clone() for k, v in trainer.raw_modules()["flow"].state_dict().items()}
        if "flow" in trainer.algorithm.modules else {},
    }, Path(dump_dir) / f"rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
