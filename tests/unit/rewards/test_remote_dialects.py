"""The other dialects: Flow-GRPO's pickle reward servers and an OpenAI-compatible VLM judge, against stand-ins
(tests/helpers/reward_standins.py) written from their documented formats, on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
from test_remote_rewards import PROMPTS, error_lines, quantised_images, train

from dagcli.errors import DagError
from dagcli.rewards import build_reward
from helpers.remote import metrics, standin


def dialect(url: str, scheme: str) -> str:
    return url.replace("http://", f"{scheme}+http://", 1)


# --- pickle ---------------------------------------------------------------------------------------------------
def test_pickle_server_gets_jpegs_and_metadata_and_its_scores_come_back():
    metadata = [{"tag": "two_object", "include": [{"class": "cat"}, {"class": "dog"}]}, {"tag": "x"},
                {"include": [{"class": "cat", "count": 3}]}]
    with standin("pickle") as server:
        out = build_reward(dialect(server.url, "pickle") + "?batch_size=2")(quantised_images(3), ["a"] * 3, metadata)
    assert out.scores.tolist() == [2.0, 0.0, 1.0] and list(out.components) == ["pickle"]


def test_training_against_a_pickle_server(tmp_path, tiny_pipeline_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "include": [{}] * (i + 1)}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    with standin("pickle") as server:
        code, _, err = train(tmp_path / "t", tiny_pipeline_dir, capsys, dialect(server.url, "pickle"),
                             sampling={"prompts": str(prompts)})
    assert code == 0, err
    seen = metrics(tmp_path / "t" / "run")[0]["per_prompt_reward"]
    assert seen and seen == {p: float(PROMPTS.index(p) + 1) for p in seen}


def test_pickle_to_another_machine_is_refused_before_connecting(capsys):
    from helpers.cli import run_cli

    code, _, err = run_cli(["rewards", "--score", ".", "--reward", "pickle+http://10.11.12.13:18085"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "allow_remote=true" in err and "10.11.12.13" in err
    from dagcli.rewards.pickled import check_host
    from dagcli.rewards.remote import parse_url

    check_host(parse_url("pickle+http://10.11.12.13:18085"), "true")  # the opt-in passes the check
    check_host(parse_url("pickle+http://localhost:18085"), None)


def test_a_pickle_reply_that_would_run_code_is_refused():
    from dagcli.rewards.pickled import safe_loads

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this must not run",))

    with pytest.raises(DagError, match=r"needs posix\.system|needs nt\.system"):
        safe_loads(pickle.dumps({"scores": [Payload()]}), "server")
    import numpy as np

    plain = safe_loads(pickle.dumps({"scores": np.array([0.5, 1.0]), "one": np.float64(2.0)}), "server")
    assert plain["scores"].tolist() == [0.5, 1.0] and plain["one"] == 2.0


# --- VLM judge ------------------------------------------------------------------------------------------------
def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_judge_scores_from_yes_no_logprobs():
    images = quantised_images(4, seed=3)
    with standin("openai") as server:
        judge = build_reward(dialect(server.url, "vlm") + "?concurrency=3")
        out = judge(images, ["a red circle"] * 4)
    assert judge.inner.model == "judge-model"
    torch.testing.assert_close(out.scores, brightness(images), rtol=0, atol=1e-5)


def test_judge_scores_parsed_from_text_with_a_rubric_file(tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Rate {prompt} from 0 to 10 as Score: N/10.")
    images = quantised_images(3, seed=4)
    with standin("openai-text") as server:
        out = build_reward(f"{dialect(server.url, 'vlm')}?rubric={rubric}&model=judge-model")(images, ["p"] * 3)
    assert out.scores.tolist() == pytest.approx([round(10 * float(b)) / 10 for b in brightness(images)])


def test_training_against_a_judge(tmp_path, tiny_pipeline_dir, capsys):
    with standin("openai") as server:
        code, _, err = train(tmp_path, tiny_pipeline_dir, capsys, dialect(server.url, "vlm"))
    assert code == 0, err
    line = metrics(tmp_path / "run")[0]
    assert 0 < line["reward/vlm_mean"] < 1


@pytest.mark.parametrize("text, score", [("Score: 7/10", 0.7), ("Final Score: 4", 4.0), ("Yes.", 1.0),
                                         ("no", 0.0), ("I cannot tell", math.nan)])
def test_text_answers(text, score):
    from dagcli.rewards.vlm import text_score

    assert text_score(text) == pytest.approx(score, nan_ok=True)


def test_unknown_rubric_is_named():
    from dagcli.rewards.vlm import load_rubric

    with pytest.raises(DagError, match="rubric 'fancy' is neither.*yes-no, score-10"):
        load_rubric("fancy")
