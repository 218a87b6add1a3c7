"""Stage 12: bits per byte scores every token once whatever the batching, our `evaluate` metrics on hand-computed cases,
lm-evaluation-harness agreeing with our evaluator on a LoRA adapter and another split, the report card (a stage that did not
run, its figures, nothing half-written), and the regression bounds the project promises."""
import json, math, shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import load_from_disk
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llm_lifecycle.cli import main
from llm_lifecycle.constellation import load_member
from llm_lifecycle.core import STAGES, metrics_path
from llm_lifecycle.evaluation import bounds_failures, check_bounds, harness_accuracy, harness_model_args, harness_tasks, load_metric, write_report
from llm_lifecycle.sft import exact_match, text_bits_per_byte

BOUNDS = Path(__file__).parent/"regression_bounds.json"


def test_bits_per_byte_scores_every_token_once(tiny_run):
    "Batched, sorted and padded windows give the same total as scoring each window alone, and every token but the start is scored once."
    tok = AutoTokenizer.from_pretrained(tiny_run/"base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)).eval()
    texts = ["def f(x): return x + 1", "A much longer text, " * 9 + "that needs several windows of sixteen tokens.", "é ü ß ∑ — bytes, not characters"]
    got = text_bits_per_byte(model, tok, texts, start_id=1, window=16, batch=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = [1] + tok(t, add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids) - 1, 16):
                w = torch.tensor([ids[s:s + 17]])
                nll += F.cross_entropy(model(w[:, :-1]).logits[0], w[0, 1:], reduction="sum").item()
                n += w.shape[1] - 1
    assert got["tokens"] == n == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert got["bytes"] == sum(len(t.encode()) for t in texts) > sum(map(len, texts))  # UTF-8 bytes, not characters
    assert got["bpb"] == pytest.approx(nll / math.log(2) / got["bytes"], rel=1e-5)


def test_our_metrics_through_evaluate_load(tmp_path):
    "Each module file loads with `evaluate.load` from its path, and computes what it says on cases worked by hand."
    em, chrf, rouge = (load_metric(n, tmp_path) for n in ("exact_match", "chrf", "rouge"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chrf.py", "exact_match.py", "rouge.py"]
    preds, refs = ["42", " 3.5  km.", "3.50 km", "blue"], ["42", "3.5 km", "3.5 km", "7"]
    assert em.compute(predictions=preds, references=refs)["exact_match"] == 0.5
    assert em.compute(predictions=preds, references=refs, normalize=False)["exact_match"] == 0.25
    assert chrf.compute(predictions=["the cat sat"], references=["the cat sat"])["score"] == pytest.approx(100)
    assert chrf.compute(predictions=["xyz"], references=["abc"])["score"] == 0
    # ROUGE-L: the longest common subsequence of "a b c d" and "a c d e" is "a c d": precision = recall = 3/4
    assert rouge.compute(predictions=["a b c d"], references=["a c d e"], rouge_types=["rougeL"])["rougeL"] == pytest.approx(0.75)
    # ROUGE-2: bigrams {ab, bc, cd} against {ac, cd, de}: one shared, F = 1/3
    assert rouge.compute(predictions=["a b c d"], references=["a c d e"], rouge_types=["rouge2"])["rouge2"] == pytest.approx(1 / 3)


def test_the_harness_agrees_with_our_evaluator_on_a_lora_adapter(tiny_run, tmp_path):
    "On the validation split (the stage checks test) and the LoRA adapter over the base model (`peft=`), in batches of 7 against our 64."
    val = load_from_disk(str(tiny_run/"instruct"))["validation"]
    val = val.select([i for i, t in enumerate(val["task"]) if val["task"][:i].count(t) < 10])  # 10 questions per task
    model, tok = load_member(tiny_run/"lora", tiny_run)
    ours = exact_match(model, tok, val, 24)["per_task"]
    tasks = harness_tasks(val, tok, tmp_path, 24)
    theirs = harness_accuracy(harness_model_args(tiny_run/"lora", tiny_run), tmp_path, tasks, batch_size=7)
    assert theirs == ours


def _metrics_copy(run_dir: Path, dest: Path, skip=()) -> Path:
    "The run's `run.json`, `data/stats.json` and every stage's `metrics.json` but those of `skip`: what the report reads."
    for rel in ["run.json", "data/stats.json", *(metrics_path(s) for s in STAGES if s.name not in skip)]:
        if (run_dir/rel).exists():
            (dest/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir/rel, dest/rel)
    return dest


def test_the_report_lists_a_stage_that_did_not_run_and_links_its_figures(tiny_run, tmp_path, capsys):
    run = _metrics_copy(tiny_run, tmp_path/"run", skip=("constellation",))
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run/"report.md").read_text()
    assert "| 11 | Models working together | **not run** |" in report
    assert f"llm-lifecycle run --run-dir {run} --from 11 --to 11" in report
    links = [l.split("](")[1].rstrip(")") for l in report.splitlines() if l.startswith("![")]
    assert {"report/pretrain_loss.png", "report/rlhf_overoptimisation.png", "report/models.png"} <= set(links)
    assert "report/speculative.png" not in links  # stage 11's figure, and stage 11 did not run
    for l in links: assert (run/l).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", l
    ev = json.loads((run/"eval"/"metrics.json").read_text())["details"]["table"]["sft"]
    assert f"| sft | {ev['test_bpb']:.4g} | {ev['accuracy']:.4g} |" in report  # the model table's row, from eval/metrics.json


def test_a_failing_report_leaves_the_old_one_whole(tiny_run, tmp_path):
    run = _metrics_copy(tiny_run, tmp_path/"run")
    before = write_report(run).read_text()
    m = json.loads((run/"rlhf"/"metrics.json").read_text())
    del m["details"]["table"]
    (run/"rlhf"/"metrics.json").write_text(json.dumps(m))
    with pytest.raises(KeyError): write_report(run)
    assert (run/"report.md").read_text() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary report folder left behind
    assert len(list((run/"report").glob("*.png"))) == 4


def test_the_tiny_run_keeps_the_promised_bounds(tiny_run):
    rows = check_bounds(tiny_run, json.loads(BOUNDS.read_text()))
    assert len(rows) >= 15
    assert not bounds_failures(rows), bounds_failures(rows)


def test_a_worse_model_fails_the_bounds_with_a_readable_table(tiny_run, tmp_path):
    run = _metrics_copy(tiny_run, tmp_path/"run")
    p = run/"sft"/"metrics.json"
    m = json.loads(p.read_text()); m["results"]["sft_test_em"] = 0.0; p.write_text(json.dumps(m))
    (run/"constellation"/"metrics.json").unlink()
    msg = bounds_failures(check_bounds(run, json.loads(BOUNDS.read_text())))
    assert "sft.sft_test_em" in msg and "not in [" in msg
    assert "constellation.router_accuracy" in msg and "missing" in msg
    assert "evaluation.sft_accuracy" not in msg  # only what moved


def test_a_failing_harness_names_the_model_and_shows_what_it_printed(tmp_path):
    with pytest.raises(RuntimeError, match=r"lm-evaluation-harness failed on \S*nowhere \(count_words\)") as e:
        harness_accuracy(dict(pretrained=str(tmp_path/"nowhere")), tmp_path, ["count_words"])
    assert "its stderr ended:" in str(e.value)
