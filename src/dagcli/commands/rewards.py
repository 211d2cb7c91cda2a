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
    from dagcli import api
    from dagcli.progress import print_table

    if score is None:
        print_table(reward_table())
        return
    summaries = api.score(score, reward=reward, model=model, device=device, batch_size=batch_size,
                          reward_option=[*(reward_option or []), *(option or [])])
    print_table(score_table(f"{reward} on {score}", summaries))


def reward_table():
    """The table of `dag rewards`: names whole, descriptions wrapped."""
    from dagcli.progress import Column, TextTable
    from dagcli.rewards import list_rewards

    columns = (
        Column("name"),
        Column("description", wrap=True),
        Column("unit", wrap=True),
        Column("needs", wrap=True),
        Column("differentiable"),
    )
    rows = [(r.name, r.description, r.unit, r.needs, "yes" if r.differentiable else "no") for r in list_rewards()]
    return TextTable("Rewards", columns, tuple(rows), noun="reward")


def score_table(title: str, summaries):
    """The table of `dag rewards --score`: one row per component."""
    from dagcli.progress import Column, TextTable

    columns = (Column("component"), *(Column(h, numeric=True) for h in ("mean", "std", "images")))
    rows = [(s.name, f"{s.mean:.4f}", f"{s.std:.4f}", str(s.count)) for s in summaries]
    return TextTable(title, columns, tuple(rows), noun="component")


def register(app: typer.Typer) -> None:
    """Add the `rewards` command to the app."""
    from dagcli.commands.common import REWARD_SERVERS_EPILOG

    app.command("rewards", epilog=REWARD_SERVERS_EPILOG)(rewards)
