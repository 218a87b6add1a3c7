"Stage 09: the simulated annotator, preference formats and their validator, the Bradley–Terry loss, and the reward model it makes."
import json, shutil, subprocess, sys

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from llm_lifecycle.core import load_metrics
from llm_lifecycle.reward import (BadPreferences, bradley_terry_loss, gold_parts, load_reward_model, preference_pairs,
                                  read_preferences, reward_scores, spearman, spearman_within, to_preference)
from llm_lifecycle.sft import TASKS

CLI = shutil.which("llm-lifecycle")


def test_annotator_prefers_right_then_brief_then_stopping():
    t, q = TASKS["last_word"], "What is the last word of: red cat owl"
    ranked = [("owl", True), ("owl", False), ("cat", True), ("owl owl owl owl", True)]  # right > unstopped > wrong > wrong and repetitive
    scores = [sum(gold_parts(t, q, a, s).values()) for a, s in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4


def test_pairs_are_every_ranked_two_of_a_prompt_beyond_the_margin():
    from datasets import Dataset
    msgs = lambda q: [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]
    prompts = Dataset.from_list([dict(messages=msgs("Which is larger, 3 or 9?"), task="larger"),
                                 dict(messages=msgs("Which is larger, 5 or 2?"), task="larger")])
    samples = [[("3", True), ("9", True), ("9 9 9 9", False), ("9", True)], [("2", True), ("2", True), ("2", True)]]
    pairs, counts = preference_pairs(prompts, samples, TASKS, margin=0.25)
    assert counts == {"prompt": 1, "pair": 3, "prompt without a preference: its samples score within the margin": 1}
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("9", "3"), ("9", "9 9 9 9"), ("3", "9 9 9 9")]
    assert all(p["chosen_gold"] - p["rejected_gold"] >= 0.25 for p in pairs)
    assert preference_pairs(prompts, samples, TASKS, margin=0.7)[1]["pair"] == 2  # "3" and "9 9 9 9" are 0.62 apart


def test_hh_transcripts_with_several_turns(tmp_path):
    r = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 2 and 3.\n\nAssistant: 5",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Add 2 and 3.\n\nAssistant: 6"}
    pair, problems = to_preference(r)
    assert not problems and [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["chosen"] == [{"role": "assistant", "content": "5"}]
    r["rejected"] = "\n\nHuman: Hello\n\nAssistant: Hello.\n\nHuman: Add 2 and 3.\n\nAssistant: 6"
    assert to_preference(r)[1] == [("rejected", "its conversation before the last answer differs from chosen's")]


def test_every_problem_of_a_json_array_at_once(tmp_path):
    p = tmp_path/"prefs.json"
    p.write_text(json.dumps([{"prompt": "Hi", "chosen": "a", "rejected": "b"}, {"chosen": "a"}, {"prompt": "Hi", "chosen": 3, "rejected": "b"},
                             {"chosen": "no transcript", "rejected": "here either"}]))
    with pytest.raises(BadPreferences) as e: read_preferences(p)
    assert [(q["record"], q["field"]) for q in e.value.problems] == [(2, "rejected"), (3, "chosen"), (4, "chosen"), (4, "rejected")]
    assert str(p) in str(e.value) and "preference data" in str(e.value)


def test_bradley_terry_is_shift_invariant_and_matches_its_gradient():
    rc, rr = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    torch.testing.assert_close(bradley_terry_loss(rc + 3.0, rr + 3.0), loss)
    loss.backward()  # d/d r_c of −log σ(r_c − r_r) = −(1 − σ(r_c − r_r)), over the batch mean
    torch.testing.assert_close(rc.grad, -(1 - torch.sigmoid(rc - rr)).detach() / 16)


def test_spearman_within_prompts_ignores_the_level_of_each_prompt():
    "Pairs fix a score only up to a constant per prompt: a reward model can order every prompt's answers right and still correlate negatively pooled."
    gold = [0, 0.5, 1, 0, 0.5, 1, 1, 1]
    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 2  # c's answers tie on gold: there is no order to learn, so it is left out
    ordered = [11, 12, 13, 1, 2, 3, 0, 0]  # each prompt's answers in gold order, at levels unrelated to gold
    assert spearman_within(ordered, gold, prompts) == pytest.approx(1.0) and spearman(ordered, gold) < 0
    assert spearman_within([1, 2, 3, 3, 2, 1, 5, 6], gold, prompts) == pytest.approx(0.0)  # one prompt right, one reversed
    assert spearman_within([5, 5, 5, 1, 2, 3, 0, 0], gold, prompts) == pytest.approx(0.5)  # a constant score orders nothing: 0


def test_spearman_against_a_known_case():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


def test_saved_reward_model_reproduces_its_test_accuracy(tiny_run):
    "Recomputed from reward/ and prefs/: the held-out accuracy the stage recorded, well above chance."
    test = load_from_disk(str(tiny_run/"prefs"))["test"]
    model, tok = load_reward_model(tiny_run/"reward")
    rc = reward_scores(model, tok, list(test["prompt"]), [c[-1]["content"] for c in test["chosen"]])
    rr = reward_scores(model, tok, list(test["prompt"]), [c[-1]["content"] for c in test["rejected"]])
    acc = float((rc > rr).mean())
    assert acc == pytest.approx(load_metrics(tiny_run, "reward")["results"]["test_accuracy"], abs=1e-3)
    assert acc > 0.6 and len(test) >= 100


def test_malformed_preferences_fail_the_stage_and_write_nothing(tiny_run, tmp_path):
    run = tmp_path/"run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("notebooks", "checkpoints", "prefs", "reward", "rlhf",
                                                                  "constellation", "eval", "serving"))
    bad = tmp_path/"bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}\n{"prompt": "Hi", "chosen": "Hello."}\n'
                   '{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}\n')
    r = subprocess.run([CLI, "run", "--preset", "tiny", "--run-dir", str(run), "--from", "09", "--to", "09", "-p", f"reward.prefs={bad}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "record 2 (line 2), field 'rejected': missing" in r.stderr
    assert "record 3 (line 3), field 'rejected': is identical to chosen" in r.stderr
    assert not (run/"prefs").exists() and not (run/"reward").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_reward_model_prefers_an_answer_to_none(tiny_run):
    "On held-out prompts, the right answer scores above \"I do not know.\", an answer the pairs never contained."
    test = load_from_disk(str(tiny_run/"prefs"))["test"]
    prompts = list({json.dumps(p): (p, t) for p, t in zip(test["prompt"], test["task"])}.values())
    rights = [TASKS[t].answer(TASKS[t].parse(p[-1]["content"])) for p, t in prompts]
    model, tok = load_reward_model(tiny_run/"reward")
    score = lambda answers: reward_scores(model, tok, [p for p, _ in prompts], answers)
    right = score(rights)
    assert len(prompts) >= 60
    assert (right > score(["I do not know."] * len(rights))).mean() > 0.8
