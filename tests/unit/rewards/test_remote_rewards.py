"""Rewards behind HTTP: `dag serve-reward`, the `http://` client, faults of a server, prompt metadata.

Every server is a real process on 127.0.0.1 (an ephemeral port) started by the test: `dag serve-reward` itself, or
a stand-in of tests/helpers/reward_standins.py written from the protocol.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch

from dagcli.errors import DagError
from dagcli.rewards import build_reward, parse_spec
from helpers.cli import run_cli, write_tiny_config
from helpers.remote import closed_port, dag_command, metrics, serve_reward, standin

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
FAST = "timeout=5&retries=1&backoff=0.05"


def quantised_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Images whose pixels are exact multiples of 1/255 (what a PNG carries without loss)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


@pytest.fixture(scope="module")
def jpeg_server():
    """`dag serve-reward compressibility` for the whole module."""
    with serve_reward("compressibility", "--batch-size", "2") as server:
        yield server


def train(tmp_path, model_dir, capsys, spec: str, prompts=PROMPTS, epochs: int = 1, **sections):
    """`dag train` of the tiny model with DDPO (one reward request per epoch) -> (exit code, stdout, stderr)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    given = {"train": {"epochs": epochs, "algorithm": "ddpo"}, "output": {"dir": str(tmp_path / "run")},
             "reward": {"spec": spec}}
    for name, keys in sections.items():
        given[name] = {**given.get(name, {}), **keys}
    cfg = write_tiny_config(tmp_path, model_dir, prompts, **given)
    return run_cli(["train", "--config", cfg], capsys)


def error_lines(err: str) -> list[str]:
    """The error lines of a command's stderr (the banner and warnings are other lines)."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- the spec and the client ------------------------------------------------------------------------------
def test_url_parts_parse_with_ports_and_weights():
    parts = parse_spec("compressibility:0.5,http://127.0.0.1:8000:2,http://[::1]:9/score,https://h:1/x:0.25")
    assert [(p.label, p.weight) for p in parts] == [
        ("compressibility", 0.5), ("http://127.0.0.1:8000", 2.0), ("http://[::1]:9/score", None),
        ("https://h:1/x", 0.25)]


@pytest.mark.parametrize("spec, words", [
    ("http://127.0.0.1:99999", ["port", "99999"]),
    ("http://127.0.0.1:0.5", ["port", "0.5"]),
    ("ftp://127.0.0.1:21", ["'ftp'", "pickle+http"]),
    ("http://:8000", ["bad reward server URL"]),
    ("http://127.0.0.1:8000?timeout", ["?OPTION=VALUE"]),
])
def test_malformed_url_is_named(spec, words):
    with pytest.raises(DagError) as e:
        build_reward(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_remote_scores_equal_local_scores(jpeg_server):
    images, prompts = quantised_images(5), ["p"] * 5
    remote = build_reward(jpeg_server.url)(images, prompts)
    local = build_reward("compressibility")(images, prompts)
    torch.testing.assert_close(remote.scores, local.scores, rtol=0, atol=1e-6)
    assert list(remote.components) == ["remote"]


def test_served_tiny_clip_equals_local_clip():
    images, prompts = quantised_images(4, seed=2), ["a red circle", "a blue square"] * 2
    with serve_reward("clip", "--model", "tiny") as server:
        remote = build_reward(server.url + "?batch_size=3")(images, prompts).scores
    local = build_reward("clip", base_model="tiny")(images, prompts).scores
    torch.testing.assert_close(remote, local, rtol=0, atol=1e-6)
    assert remote.std() > 0  # distinct cosines, not one constant


def test_weighted_sum_logs_each_component(jpeg_server):
    images, prompts = quantised_images(3, seed=1), ["p"] * 3
    spec = f"incompressibility:0.5,{jpeg_server.url}?name=jpeg&batch_size=2:2"
    out = build_reward(spec)(images, prompts)
    local = build_reward("compressibility")(images, prompts).scores
    assert set(out.components) == {"incompressibility", "jpeg"}
    torch.testing.assert_close(out.components["jpeg"], local, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.scores, -0.5 * local + 2 * local, rtol=1e-6, atol=1e-6)


def test_options_from_reward_options_and_query_are_checked(jpeg_server):
    with pytest.raises(DagError, match="unknown option 'colour'.*valid options: backoff, batch_size"):
        build_reward(jpeg_server.url, options={jpeg_server.url: {"colour": "red"}})
    with pytest.raises(DagError, match="option batch_size must be a positive integer"):
        build_reward(jpeg_server.url + "?batch_size=0")


def test_health_answers_what_is_served(jpeg_server):
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    health = json.loads(opener.open(jpeg_server.url + "/health", timeout=10).read())
    assert health["status"] == "ok" and health["reward"] == "compressibility" and health["batch_size"] == 2
    assert jpeg_server.first_line.startswith("serving reward compressibility at http://127.0.0.1:")


def test_a_bad_request_is_http_400_with_the_reason(jpeg_server):
    reward = build_reward(jpeg_server.url)
    with pytest.raises(DagError, match=r"HTTP 400 .*'images' must be a list of base64 images"):
        reward.inner.client.request(jpeg_server.url + "/compute", json.dumps({"prompts": ["a"], "images": []}).encode())


# --- training against servers -----------------------------------------------------------------------------
def test_training_against_serve_reward_equals_local_training(tmp_path, tiny_pipeline_dir, capsys, jpeg_server):
    code, _, err = train(tmp_path / "remote", tiny_pipeline_dir, capsys, jpeg_server.url,
                         sampling={"overlap_rewards": True})
    assert code == 0, err
    code, _, err = train(tmp_path / "local", tiny_pipeline_dir, capsys, "compressibility")
    assert code == 0, err
    remote, local = metrics(tmp_path / "remote" / "run")[0], metrics(tmp_path / "local" / "run")[0]
    assert remote["reward_mean"] == pytest.approx(local["reward_mean"], abs=1e-6)
    assert remote["reward/remote_mean"] == pytest.approx(local["reward/compressibility_mean"], abs=1e-6)
    assert remote["per_prompt_reward"] == pytest.approx(local["per_prompt_reward"], abs=1e-6)


def test_prompt_metadata_reaches_a_remote_reward(tmp_path, tiny_pipeline_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    values = {"a red circle": 3.0, "a blue square": -1.0}
    prompts.write_text("".join(json.dumps({"prompt": p, "value": v, "tag": "t"}) + "\n" for p, v in values.items()))
    with standin("ok") as server:
        code, _, err = train(tmp_path, tiny_pipeline_dir, capsys, server.url, sampling={"prompts": str(prompts)})
    assert code == 0, err
    seen = metrics(tmp_path / "run")[0]["per_prompt_reward"]
    assert seen and {p: values[p] for p in seen} == seen


def test_metadata_goes_to_rewards_that_take_it_and_not_to_older_ones():
    from dagcli.rewards.plugins import ValidatedReward

    seen = []

    def with_metadata(images, prompts, metadata=None):
        seen.append(metadata)
        return torch.zeros(len(images))

    def without(images, prompts):  # written before rewards took metadata
        return torch.ones(len(images))

    meta = [{"tag": "colors"}, {"include": [{"class": "cat"}]}]
    images = quantised_images(2)
    assert ValidatedReward(with_metadata, "a", "a", plugin=True)(images, ["x", "y"], meta).scores.tolist() == [0, 0]
    assert seen == [meta]
    assert ValidatedReward(without, "b", "b", plugin=True)(images, ["x", "y"], meta).scores.tolist() == [1, 1]


def test_eval_gives_metadata_to_the_reward_and_keeps_it_in_the_report(tmp_path, tiny_pipeline_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "a red circle", "value": 2.5, "tag": "colors", "include": [{"class": "circle", "count": 1}]},
               {"prompt": "a blue square", "value": -0.5, "tag": "single_object"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    with standin("ok") as server:
        code, _, err = run_cli(["eval", "--prompts", prompts, "--reward", server.url, "-n", "2", "--steps", "2",
                                "--guidance", "1", "--model", tiny_pipeline_dir, "--embed-model", "none",
                                "--device", "cpu", "-o", tmp_path / "out"], capsys)
        assert code == 0, err
        rescored = run_cli(["rewards", "--score", tmp_path / "out" / "images" / "base", "--reward", server.url],
                           capsys)  # the metadata dag sample recorded in samples.jsonl reaches the reward too
    row = next(line.split() for line in rescored[1].splitlines() if line.startswith("remote"))
    assert rescored[0] == 0 and row[1:4] == ["1.0000", "1.5000", "4"], rescored  # 2.5, 2.5, -0.5, -0.5 (not 1s)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    blocks = report["models"][0]["per_prompt"]
    assert [b["metadata"] for b in blocks] == [{k: v for k, v in r.items() if k != "prompt"} for r in records]
    assert [b["rewards"]["remote"]["scores"] for b in blocks] == [[2.5, 2.5], [-0.5, -0.5]]


def test_unreachable_server_stops_before_sampling(tmp_path, tiny_pipeline_dir, capsys):
    code, _, err = train(tmp_path, tiny_pipeline_dir, capsys, f"http://127.0.0.1:{closed_port()}?{FAST}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err  # before the banner: nothing but the error
    assert "cannot connect" in err and "dag serve-reward" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("mode, words", [
    ("stall", ["no answer within 1 s", "raise the option timeout"]),
    ("killed", ["connection", "after 2 attempts"]),
])
def test_server_lost_mid_run_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, tiny_pipeline_dir, capsys,
                                                                         mode, words):
    # epoch 1 is one request; the stand-in then holds the next one, or dag serve-reward is SIGKILLed by it
    fault = {"DAGCLI_FAULT": "serve-reward-compute:2"}
    with (standin("stall", 1) if mode == "stall" else serve_reward("compressibility", env=fault)) as server:
        code, _, err = train(tmp_path, tiny_pipeline_dir, capsys, f"{server.url}?timeout=1&retries=1&backoff=0.05",
                             epochs=3, output={"checkpoint_every": 1})
    assert code == 2 and len(error_lines(err)) == 1, err
    assert all(w in err for w in [*words, "stopping in epoch 2", "--resume", "step-000001"]), err
    from dagcli.checkpoint import list_checkpoints, read_meta

    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]
    assert read_meta(list_checkpoints(tmp_path / "run")[0][1])["step"] == 1
    assert len(metrics(tmp_path / "run")) == 1


@pytest.mark.parametrize("mode, count, words", [
    ("error", 0, ["HTTP 500", "CUDA out of memory in the test server", "after 2 attempts"]),
    ("error", 400, ["HTTP 400", "CUDA out of memory in the test server"]),
    ("short", 0, ["replied 2 scores for 3 images"]),
    ("text", 0, ["non-numeric score '1.0' at position 0"]),
    ("garbage", 0, ["not JSON", "502 Bad Gateway"]),
])
def test_bad_replies_are_one_line_errors(mode, count, words):
    with standin(mode, count) as server:
        reward = build_reward(f"{server.url}?{FAST}")
        with pytest.raises(DagError) as e:
            reward(quantised_images(3), ["a", "b", "c"])
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_nan_scores_follow_the_local_nan_policy(tmp_path, tiny_pipeline_dir, capsys):
    with standin("nan") as server:
        with pytest.raises(DagError, match="returned 1 non-finite score"):
            build_reward(server.url)(quantised_images(2), ["a", "b"])  # strict, as for a local reward
        out = build_reward(server.url, strict_finite=False)(quantised_images(2), ["a", "b"])
        assert out.info["nonfinite"] == 1 and torch.isnan(out.scores[0]) and out.scores[1] == 1.0
        code, _, err = train(tmp_path, tiny_pipeline_dir, capsys, server.url, reward={"max_nonfinite": 0})
    assert code == 2 and "NaN/inf rewards exceed reward.max_nonfinite = 0" in err, err


# --- the command --------------------------------------------------------------------------------------------
def test_serve_reward_stops_cleanly_on_ctrl_c():
    with serve_reward("compressibility") as server:
        build_reward(server.url)  # its health check: the server is serving
        server.proc.send_signal(signal.SIGINT)
        out, err = server.proc.communicate(timeout=30)
    assert server.proc.returncode in (0, 130)
    assert len(err.strip().splitlines()) == 1 and "stopped serving" in err and "Traceback" not in err


def test_serve_reward_port_in_use_and_bad_spec_are_one_line(jpeg_server):
    busy = subprocess.run([*dag_command(), "serve-reward", "compressibility", "--port", str(jpeg_server.port),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "choose another --port" in busy.stderr and len(busy.stderr.splitlines()) == 1


def test_serve_reward_unknown_reward_is_a_usage_error(capsys):
    code, _, err = run_cli(["serve-reward", "no-such-reward", "--port", "0"], capsys)
    assert code == 2 and "unknown reward 'no-such-reward'" in err
