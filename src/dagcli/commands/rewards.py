"""`dag rewards`: the reward table, or (with --score DIR) reward statistics of a folder of images."""

from __future__ import annotations

from pathlib import Path

import typer


def rewards(
    score: Path = typer.Option(None, "--score", help="Score the images in this folder instead of listing rewards."),
    reward: str = typer.Option("compressibility", "--reward", "-r", help="Reward spec, e.g. aesthetic:1,clip:0.5."),
    model: str = typer.Option(None, "--model", "-m", help="Base model the images came from (picks clip's default)."),
    device: str = typer.Option("cpu", "--device", help="Device for reward models: auto|cpu|cuda."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per reward call."),
    reward_option: list[str] = typer.Option(
        None, "--reward-option", metavar="<key=value>", help="Reward option REWARD.KEY=VALUE (repeatable)."
    ),
    option: list[str] = typer.Option(None, "--option", hidden=True, help="Former name of --reward-option."),
) -> None:
    """List the available rewards (name, description, unit, needs), or score a folder with --score."""
    from rich.console import Console
    from rich.table import Table

    from dagcli.errors import DagError
    from dagcli.rewards import build_reward, list_rewards
    from dagcli.rewards.registry import parse_reward_options
    from dagcli.rewards.scoring import score_folder

    console = Console()
    if score is None:
        table = Table("name", "description", "unit", "needs", "differentiable", title="Rewards")
        for info in list_rewards():
            table.add_row(info.name, info.description, info.unit, info.needs, "yes" if info.differentiable else "no")
        console.print(table)
        return
    if batch_size <= 0:
        raise DagError(f"--batch-size must be positive, got {batch_size}")
    options = parse_reward_options([*(reward_option or []), *(option or [])])
    summaries = score_folder(build_reward(reward, device=device, base_model=model, options=options), score, batch_size)
    table = Table("component", "mean", "std", "images", title=f"{reward} on {score}")
    for s in summaries:
        table.add_row(s.name, f"{s.mean:.4f}", f"{s.std:.4f}", str(s.count))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the `rewards` command to the app."""
    app.command("rewards")(rewards)
