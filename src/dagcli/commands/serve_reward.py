"""`dag serve-reward SPEC`: put any reward (built-in, sum or plugin) behind dagcli's HTTP protocol."""

from __future__ import annotations

import typer


def serve_reward(
    spec: str = typer.Argument(..., metavar="SPEC", help="Reward spec, e.g. clip, aesthetic:1,clip:0.5 or a plugin."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port, shown at start)."),
    device: str = typer.Option("auto", "--device", help="Device for the reward models: auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per reward call (a request is split)."),
    model: str = typer.Option(None, "--model", "-m", help="Base model the images come from (picks clip's default)."),
    reward_option: list[str] = typer.Option(
        None, "--reward-option", metavar="<key=value>", help="Reward option REWARD.KEY=VALUE (repeatable)."
    ),
) -> None:
    """Serve a reward over HTTP for `--reward http://HOST:PORT` (POST /compute, GET /health).

    Runs until Ctrl-C or SIGTERM. The reward runs in this process's environment and on its device, so a trainer elsewhere needs none of its dependencies.
    """
    from dagcli.errors import DagError
    from dagcli.rewards import build_reward
    from dagcli.rewards.base import parse_device
    from dagcli.rewards.registry import parse_reward_options

    if batch_size <= 0:
        raise DagError(f"--batch-size must be positive, got {batch_size}")
    if not 0 <= port <= 65535:
        raise DagError(f"--port must be 0 to 65535, got {port}")
    options = parse_reward_options(list(reward_option or []))
    reward = build_reward(spec, device=str(parse_device(device)), base_model=model, options=options,
                          strict_finite=False)
    serve(reward, spec, host, port, batch_size)


def serve(reward, spec: str, host: str, port: int, batch_size: int) -> None:
    """Listen until interrupted; the start and the stop are one line each."""
    import signal
    import sys

    from dagcli.errors import DagError
    from dagcli.rewards.serve import RewardServer

    try:
        server = RewardServer(reward, spec, host, port, batch_size)
    except OSError as e:
        raise DagError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                       "(0 picks a free one) or --host") from e

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        typer.echo(f"serving reward {spec} at {server.url} (POST /compute, GET /health); Ctrl-C stops")
        sys.stdout.flush()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        typer.echo(f"stopped serving {server.url} ({server.scored} images scored)", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def register(app: typer.Typer) -> None:
    """Add the `serve-reward` command to the app."""
    from dagcli.commands.common import REWARD_SERVERS_EPILOG

    app.command("serve-reward", epilog=REWARD_SERVERS_EPILOG)(serve_reward)
