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
    from dagcli import api

    server = api.reward_server(spec, host=host, port=port, device=device, batch_size=batch_size, model=model,
                               reward_option=reward_option or [])
    serve(server, spec)


def serve(server, spec: str) -> None:
    """Listen until interrupted; the start and the stop are one line each."""
    import signal
    import sys

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
