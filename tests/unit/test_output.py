"""What a person reads: image folders read one way by every command, whole names, plain lines in a pipe."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dagcli.errors import DagError
from dagcli.evaluation.render import fmt_stat
from dagcli.progress import (
    Column,
    NullReporter,
    PlainReporter,
    RichReporter,
    TextTable,
    default_reporter,
    fit_widths,
    print_table,
    rich_table,
)
from dagcli.rewards import list_rewards
from dagcli.rewards.base import read_image_folder

BOX = set("┏┓┗┛┃━│─┌┐└┘├┤┬┴┼╇╈┡┩")
LONG_FOLDER = "tiny-samples-in-a-folder-with-a-rather-long-name"  # wider than its share of 80 columns


def dag_in_pipe(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`dag ARGS` in a subprocess whose stdout and stderr are pipes, in an 80-column environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update(COLUMNS="80", LINES="24", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dagcli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def plain(text: str) -> list[str]:
    """The lines of a pipe's output, checked to be plain: no blank line, no box drawing, no loading bar."""
    lines = text.splitlines()
    assert all(line.strip() for line in lines), f"blank line in {text!r}"
    assert not BOX & set(text) and "Loading weights" not in text and "\r" not in text, text
    return lines


def jpeg_kb(path: Path) -> float:
    """The compressibility reward by hand: minus the size of the image as a quality-95 JPEG, in kB."""
    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, format="JPEG", quality=95)
    return -buffer.tell() / 1000


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """`dag sample` on the built-in tiny model: 2 prompts x 2 images of 32 px, plus a grid PNG per prompt."""
    folder = tmp_path_factory.mktemp("out") / LONG_FOLDER
    done = dag_in_pipe(
        "sample", "-p", "a red circle", "-p", "a blue square", "-n", "2", "--steps", "2",
        "--device", "cpu", "-o", folder, cwd=folder.parent,
    )
    assert done.returncode == 0, done.stderr
    plain(done.stdout + done.stderr)
    assert len(list(folder.glob("grid-*.png"))) == 2
    return folder


def test_rewards_score_and_eval_images_read_a_sampled_folder_alike(sampled, tmp_path):
    files = [sampled / json.loads(line)["file"] for line in (sampled / "samples.jsonl").read_text().splitlines()]
    by_hand = [jpeg_kb(f) for f in files]
    expected_mean = sum(by_hand) / len(by_hand)

    scored = dag_in_pipe("rewards", "--score", sampled, "-r", "compressibility,clip", "-m", "tiny", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    header, *rows = plain(scored.stdout)
    assert header.split() == ["component", "mean", "std", "images"]
    table = {row.split()[0]: row.split()[1:] for row in rows}
    assert set(table) == {"compressibility", "clip", "total"}
    assert float(table["compressibility"][0]) == pytest.approx(expected_mean, abs=1e-4)  # printed to 4 places
    assert all(int(values[2]) == len(files) == 4 for values in table.values())
    plain(scored.stderr)

    out = tmp_path / "eval"
    evaluated = dag_in_pipe("eval", "--images", sampled, "-r", "compressibility,clip", "--no-lpips", "-o", out,
                            cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((out / "report.json").read_text())
    overall = report["models"][0]["overall"]
    assert overall["images"] == 4
    for name in ("compressibility", "clip"):
        assert overall["rewards"][name]["mean"] == pytest.approx(float(table[name][0]), abs=1e-4)
        assert overall["rewards"][name]["std"] == pytest.approx(float(table[name][1]), abs=1e-4)
    lines = plain(evaluated.stdout)
    plain(evaluated.stderr)
    assert max(map(len, lines)) <= 80, lines  # too wide for a table at 80 columns: one block per model
    assert lines[0] == LONG_FOLDER  # the model name, whole
    assert lines[1].split() == ["compressibility:", *fmt_stat(overall["rewards"]["compressibility"]).split()]


def test_reward_list_in_a_pipe_keeps_every_name(tmp_path):
    done = dag_in_pipe("rewards", cwd=tmp_path)
    assert done.returncode == 0 and not done.stderr, done.stderr
    lines = plain(done.stdout)
    assert max(map(len, lines)) <= 80, lines
    names = [r.name for r in list_rewards()]
    assert [line for line in lines if not line.startswith(" ") and ": " not in line] == names
    assert_reward_words_whole(done.stdout)


def assert_reward_words_whole(text: str) -> None:
    """Every word of every reward's description, unit and needs is in `text` whole; a column that is the same
    for every reward is one note."""
    shown = words(text)
    for info in list_rewards():
        for field in (info.name, info.description, info.unit, info.needs):
            assert set(field.split()) <= shown, (field, sorted(set(field.split()) - shown))
    differentiable = {"yes" if r.differentiable else "no" for r in list_rewards()}
    if len(differentiable) == 1:
        assert f"differentiable: {differentiable.pop()} for every reward" in text.splitlines()


def words(text: str) -> set[str]:
    """The whitespace-separated words of a screen, table borders removed; a list's `header:` counts as `header`."""
    found = set(re.split(f"[\\s{''.join(BOX)}]+", text)) - {""}
    return found | {w.removesuffix(":") for w in found}


def test_mixed_sizes_name_two_files(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 32)).save(tmp_path / "b.png")
    with pytest.raises(DagError) as info:
        read_image_folder(tmp_path)
    message = str(info.value)
    assert "a.png is 32x32" in message and "b.png is 64x32" in message and "\n" not in message


def test_manifest_lists_missing_files_only(tmp_path):
    (tmp_path / "samples.jsonl").write_text(json.dumps({"file": "gone.png", "prompt": "x"}) + "\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "unlisted.png")
    with pytest.raises(DagError, match="of the 1 listed in samples.jsonl"):
        read_image_folder(tmp_path)


# --- reporters and tables -------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reporter_is_plain_when_stderr_is_not_a_terminal(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    reporter = default_reporter()
    assert isinstance(reporter, PlainReporter)
    with reporter.task("sampling", total=3) as advance:
        advance(3)
    reporter.info("[bold]dag train[/] on tiny")
    reporter.warn("a [red]warning[/]")
    assert pipe.getvalue() == "dag train on tiny\nwarning: a warning\n"

    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert isinstance(default_reporter(), RichReporter)
    monkeypatch.setattr(sys, "stderr", None)
    assert isinstance(default_reporter(), NullReporter)


def eval_like_table(label: str) -> TextTable:
    columns = (Column("model"), *(Column(h, numeric=True) for h in ("compressibility", "clip", "diversity")))
    rows = (("base", "-0.9871 ± 0.00612", "0.5634 ± 0.0105", "0.1234"), (label, "-1.234 ± 0.0567", "0.6 ± 0.01", "–"))
    return TextTable("dag eval", columns, rows)


def test_tables_keep_names_and_numbers_whole_in_an_80_column_terminal():
    from rich.console import Console

    from dagcli.commands.rewards import reward_table

    for table, width in ((reward_table(), 200), (eval_like_table("run-with-a-long-name@step-000100"), 80)):
        widths = fit_widths(table, width)
        assert widths is not None
        screen = FakeTerminal()
        Console(file=screen, width=width, force_terminal=True, color_system=None).print(rich_table(table, widths))
        lines = screen.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width
        cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
        first_column = {row[0] for row in cells}
        assert {row[0] for row in table.rows} <= first_column, lines  # each name whole, on one line
        assert {w for row in table.rows for cell in row for w in cell.split()} <= words(screen.getvalue())
        headers = " ".join(lines[:4])
        assert all(c.header in headers for c in table.columns), lines
    numbers = {word for row in cells for cell in row[1:] for word in cell.split()}
    assert {"-0.9871", "0.00612", "0.5634", "0.0105", "0.1234", "-1.234", "0.0567"} <= numbers, lines


def test_the_reward_table_is_a_list_at_80_columns_and_its_all_no_column_a_note(monkeypatch):
    from dagcli.commands.rewards import reward_table

    monkeypatch.setenv("COLUMNS", "80")
    assert fit_widths(reward_table(), 80) is None  # "openai/clip-vit-large-patch14 + ..." leaves too little
    for screen in (FakeTerminal(), io.StringIO()):
        print_table(reward_table(), file=screen)
        text = screen.getvalue()
        assert max(map(len, text.splitlines())) <= 80 and not BOX & set(text), text
        assert_reward_words_whole(text)
        assert "differentiable" not in text.splitlines()[0]


def test_a_table_too_wide_for_the_terminal_is_a_list_with_names_whole():
    table = eval_like_table("x" * 90)
    assert fit_widths(table, 80) is None
    screen = FakeTerminal()
    print_table(table, file=screen)
    lines = screen.getvalue().splitlines()
    assert lines == ["base", "  compressibility: -0.9871 ± 0.00612", "  clip: 0.5634 ± 0.0105", "  diversity: 0.1234",
                     "x" * 90, "  compressibility: -1.234 ± 0.0567", "  clip: 0.6 ± 0.01", "  diversity: –"]


def test_columns_alike_in_every_row_become_a_note_only_when_the_table_is_too_wide():
    columns = (Column("name"), Column("kind"), Column("score", numeric=True))
    table = TextTable("t", columns, (("a" * 30, "same", "1"), ("b" * 30, "same", "2")), noun="thing")
    narrow, wide = io.StringIO(), io.StringIO()
    print_table(table, file=narrow)
    assert narrow.getvalue().splitlines()[0].split() == ["name", "kind", "score"]  # fits 80: kept
    table = TextTable("t", columns, (("a" * 70, "same", "1"), ("b" * 70, "same", "2")), noun="thing")
    print_table(table, file=wide)
    assert wide.getvalue().splitlines() == ["name" + " " * 68 + "score", "a" * 70 + "      1", "b" * 70 + "      2",
                                            "kind: same for every thing"]


def test_print_table_to_a_pipe_is_aligned_plain_lines():
    pipe = io.StringIO()
    print_table(eval_like_table("ckpt"), file=pipe)
    assert pipe.getvalue().splitlines() == [
        "model    compressibility             clip  diversity",
        "base   -0.9871 ± 0.00612  0.5634 ± 0.0105     0.1234",
        "ckpt     -1.234 ± 0.0567       0.6 ± 0.01          –",
    ]


def test_read_image_folder_is_what_both_commands_use(sampled):
    from dagcli.evaluation import folder_set

    found = read_image_folder(sampled)
    image_set = folder_set(sampled, "s", None)
    assert [f.name for f in found.files] == [Path(f).name for f in image_set.files]
    assert len(found.files) == 4 and not any(f.name.startswith("grid-") for f in found.files)
    assert found.prompts == image_set.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    assert image_set.seeds == [0, 1, 2, 3]


# --- 80 columns in a real terminal -----------------------------------------------------------------------


def dag_in_terminal(*args, cwd: Path, columns: int = 80) -> str:
    """What `dag ARGS` (the installed script) shows in a pseudo-terminal `columns` wide, stdout and stderr
    together: one entry per line or carriage-return segment, styles and cursor moves removed."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update(COLUMNS=str(columns), LINES="24", TERM="xterm")
    proc = subprocess.Popen([*dag_script(), *map(str, args)], cwd=cwd, env=env, stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=600) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8"))
    return "\n".join(part for part in re.split(r"\r\n|\r|\n", text))


def dag_script() -> list[str]:
    """The installed `dag` script next to this interpreter, else `python -m dagcli`."""
    script = Path(sys.executable).parent / "dag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]


def test_reward_list_fits_an_80_column_terminal_with_every_word_whole(tmp_path):
    shown = dag_in_terminal("rewards", cwd=tmp_path)
    assert max(map(len, shown.splitlines())) <= 80, shown
    assert_reward_words_whole(shown)


def test_eval_summary_fits_an_80_column_terminal_with_every_word_whole(sampled, tmp_path):
    from dagcli.evaluation.render import summary_rows

    shown = dag_in_terminal("eval", "--images", sampled, "-r", "compressibility,clip", "--no-lpips", "-o",
                            tmp_path / "eval", cwd=tmp_path)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    lines = [line for line in shown.splitlines() if "report.json" not in line]  # not the path of tmp_path
    assert max(map(len, lines)) <= 80, shown
    header, rows = summary_rows(report)
    assert LONG_FOLDER in lines
    assert {w for cell in [*header[1:], *rows[0]] for w in cell.split()} <= words(shown), shown


def help_words(command: str) -> set[str]:
    """Every word of the help texts of a command (or of `dag` itself) and its options, as written."""
    import typer.main

    from dagcli import cli

    cli._register_commands()
    group = typer.main.get_command(cli.app)
    cmd = group.commands[command] if command else group
    texts = [cmd.help or "", cmd.epilog or "", *(p.help or "" for p in cmd.params if not p.hidden)]
    return {w.replace("\\[", "[") for text in texts for w in text.split()}


@pytest.mark.parametrize("command", ["", "train", "sample", "eval", "export", "rewards"])
def test_help_is_plain_in_a_pipe_boxed_in_a_terminal_and_fits_80_columns_with_words_whole(command, tmp_path):
    args = [command, "--help"] if command else ["--help"]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    piped = subprocess.run([*dag_script(), *args], cwd=tmp_path, env={**env, "COLUMNS": "80"}, capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0 and not piped.stderr, piped.stderr
    shown = dag_in_terminal(*args, cwd=tmp_path)
    assert not BOX & set(piped.stdout) and "\x1b" not in piped.stdout, piped.stdout
    assert "╭" in shown and "Usage: dag" in piped.stdout and "Usage: dag" in shown
    for text in (piped.stdout, shown):
        assert max(map(len, text.splitlines())) <= 80, text
        assert help_words(command) <= words(text), sorted(help_words(command) - words(text))
