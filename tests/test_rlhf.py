"Stage 10: PPO's pieces on hand-computed cases, and the KL penalty holding the policy at the reference."
import json, subprocess, sys

import pytest
import torch


from llm_lifecycle.rlhf import clipped_policy_loss, clipped_value_loss, gae, pack, token_logprobs, whiten


def test_gae_on_a_three_step_episode():
    # rewards 0, 0, 1; values 0.5, 0.6, 0.7; γ = 1, λ = 0.95. By hand:
    # δ2 = 1 − 0.7 = 0.3                      A2 = 0.3
    # δ1 = 0 + 0.7 − 0.6 = 0.1                A1 = 0.1 + 0.95·0.3 = 0.385
    # δ0 = 0 + 0.6 − 0.5 = 0.1                A0 = 0.1 + 0.95·0.385 = 0.46575
    r, v, m = torch.tensor([[0.0, 0, 1]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0]]))


def test_gae_ends_each_row_at_its_last_token():
    "A padded row's episode ends at its last real token: what follows (padding) adds nothing, and γ < 1 discounts."
    r = torch.tensor([[0.0, 0, 1], [0.0, 2, 9]])  # row 2 has 2 tokens; its 9 is padding
    v = torch.tensor([[0.0, 0, 0], [0.0, 0, 5]])
    m = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, _ = gae(r, v, m, gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]))


@pytest.mark.parametrize("adv,ratio,loss,clipped,grad", [
    (1.0, 1.1, -1.1, False, -1.0),   # inside the range: the plain surrogate −A·r, gradient −A
    (1.0, 1.5, -1.2, True, 0.0),     # A > 0, r above 1 + ε: capped at (1 + ε)·A, no gradient to push it further
    (1.0, 0.5, -0.5, False, -1.0),   # A > 0, r below 1 − ε: the pessimistic min keeps the unclipped term
    (-1.0, 0.5, 0.8, True, 0.0),     # A < 0, r below 1 − ε: capped, no gradient
    (-1.0, 1.5, 1.5, False, 1.0),    # A < 0, r above 1 + ε: unclipped, the gradient pulls r back
])
def test_clipped_objective_inside_and_outside_the_range(adv, ratio, loss, clipped, grad):
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
    out, frac = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), clip=0.2)
    out.backward()
    assert out.item() == pytest.approx(loss) and frac.item() == float(clipped)
    assert logp.grad.item() == pytest.approx(grad * ratio)  # d(−A·r)/d log r = −A·r


def test_value_loss_clips_the_update_around_the_old_value():
    old, ret, m = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1)
    assert clipped_value_loss(torch.tensor([[0.1]]), old, ret, m, 0.2).item() == pytest.approx(0.5 * 0.9 ** 2)
    # moved to 3.0: unclipped error (3 − 1)² = 4; clipped to 0.2, error 0.64; the max: 4
    assert clipped_value_loss(torch.tensor([[3.0]]), old, ret, m, 0.2).item() == pytest.approx(0.5 * 4)
    # moved to 0.9: unclipped 0.01, clipped (0.2 − 1)² = 0.64; the max keeps the pessimistic 0.64
    assert clipped_value_loss(torch.tensor([[0.9]]), old, ret, m, 0.2).item() == pytest.approx(0.5 * 0.64)


def test_whitening_ignores_padding():
    x, m = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_response_tokens_are_read_from_the_logits_that_predict_them():
    samples = [dict(query=[1, 2], response=[3, 4, 5]), dict(query=[1, 2, 3, 4], response=[6])]
    ids, pos, mask = pack(samples, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    logits = torch.randn(2, 5, 8)
    lp = token_logprobs(logits, ids, pos)
    want = torch.log_softmax(logits, -1)
    assert lp[0].tolist() == pytest.approx([want[0, 1, 3].item(), want[0, 2, 4].item(), want[0, 3, 5].item()])
    assert lp[1, 0].item() == pytest.approx(want[1, 3, 6].item())


def test_a_huge_kl_coefficient_holds_the_policy_at_the_reference(tiny_run):
    """Same seed, same prompts, the preset's learning rate, 32 iterations: with β = 100 the policy's KL to the reference,
    measured on held-out prompts, stays near zero (0.024 on tiny's standard-library corpus, 0.010 on an earlier one),
    while β = 0 drifts (1.43; 1.68 on the earlier corpus; at 16 iterations it was 0.45 and 0.21 on two earlier corpora,
    too close to call). The penalty is the exact KL in the loss (the
    default): its gradient points back to the reference without sampling noise. Not exactly zero: Adam's steps have the
    size of the learning rate whatever the gradient, so the policy jitters around the reference (on an earlier corpus,
    16 iterations at ten times the learning rate: KL 0.71 against β = 0's 2.51). Put in the reward instead, as a
    one-sample estimate, the penalty did not hold the policy at all (there, β = 100 drifted to KL 6.28 against β = 0's
    2.51): the advantages are whitened and Adam normalises the step, so a larger β only makes the noisy estimate steer it."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from llm_lifecycle.model import load_hf
    from llm_lifecycle.rlhf import ppo, rollout, sequence_logprobs
    from llm_lifecycle.sft import TASKS, make_instructions
    as_prompts = lambda ds: [m[:-1] for m in ds["messages"]]
    ds = make_instructions([], ["count_words", "larger"], 200, 0, history_frac=0.0, system_frac=0.0, seed=2)["train"]
    prompts = Dataset.from_dict(dict(prompt=as_prompts(ds), task=ds["task"]))
    held = as_prompts(make_instructions([], ["count_words", "larger"], 40, 0, history_frac=0.0, system_frac=0.0, seed=5)["train"])
    tok, ref = AutoTokenizer.from_pretrained(tiny_run/"sft"), load_hf(tiny_run/"sft").eval()
    def held_out_kl(lm):
        s = rollout(lm, tok, held, 4, 24, 1.0, torch.Generator().manual_seed(0))
        return (sequence_logprobs(lm, s, tok.pad_token_id) - sequence_logprobs(ref, s, tok.pad_token_id)).mean().item()
    kl = {b: held_out_kl(ppo(tiny_run/"sft", tiny_run/"reward", prompts, TASKS, iterations=32, prompts_per_iter=8, lr=1e-4, kl_coef=b,
                             progress=False)[0]) for b in (0.0, 100.0)}
    assert kl[0.0] > 0.3 and abs(kl[100.0]) < min(0.1, kl[0.0] / 5), kl


def test_rollouts_batched_by_length_keep_each_prompts_answers(tiny_run):
    "Rollouts batch the prompts of one length: every sample is still its own prompt's, k per prompt, in order; and a greedy answer is the one its prompt gets alone."
    from transformers import AutoTokenizer
    from llm_lifecycle.generation import continuations, generate
    from llm_lifecycle.model import load_hf
    from llm_lifecycle.rlhf import by_length, greedy_answers, prompt_ids, rollout
    from llm_lifecycle.sft import make_instructions, stop_token_ids
    prompts = [m[:-1] for m in make_instructions([], ["count_words", "larger"], 12, 0, history_frac=0.0, system_frac=0.5, seed=7)["train"]["messages"]]
    tok, lm = AutoTokenizer.from_pretrained(tiny_run/"sft"), load_hf(tiny_run/"sft").eval()
    queries, stops = [prompt_ids(tok, p) for p in prompts], stop_token_ids(tok)
    groups = by_length(queries, 2)
    assert sorted(i for _, rows in groups for i in rows) == list(range(len(prompts)))  # every prompt once
    assert all(len(queries[i]) == n for n, rows in groups for i in rows) and len(groups) < len(prompts)  # some share a batch
    s = rollout(lm, tok, prompts, 3, 16, 1.0, torch.Generator().manual_seed(0), batch=6)
    assert [x["query"] for x in s] == [q for q in queries for _ in range(3)] and [x["prompt"] for x in s] == [p for p in prompts for _ in range(3)]
    assert all(x["stopped"] == (bool(x["response"]) and x["response"][-1] in stops) for x in s)
    alone = [tok.decode(continuations(generate(lm, torch.tensor([q]), 16, eos_token_id=stops), len(q), stops)[0], skip_special_tokens=True).strip()
             for q in queries]
    assert greedy_answers(lm, tok, prompts, 16, batch=4) == alone


@pytest.mark.parametrize("kw,field", [(dict(kl_penalty="los"), "kl_penalty"), (dict(reward="rm"), "reward")])
def test_ppo_refuses_an_unknown_mode_before_loading_anything(tmp_path, kw, field):
    "A misspelt mode used to run silently as the other one (any kl_penalty but 'loss' put the KL in the reward)."
    from llm_lifecycle.rlhf import ppo
    with pytest.raises(ValueError, match=f"{field}=.*'"):
        ppo(tmp_path/"no_policy", tmp_path/"no_reward", None, {}, **kw)


@pytest.mark.parametrize("name", ["ppo", "dpo", "grpo", "grpo_gold"])
def test_policies_are_plain_model_folders_that_stop(tiny_run, name):
    "Each saved policy loads in a fresh process with transformers alone and ends its answers at <|end|>."
    d = tiny_run/"rlhf"/name
    code = f"""
import json
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(d)!r}); m = AutoModelForCausalLM.from_pretrained({str(d)!r})
tok.padding_side = "left"
qs = ["How many words are in this text: red blue cat", "Which is larger, 12 or 40?", "Find the number: He paid 7 dollars."]
enc = tok([tok.apply_chat_template([dict(role="user", content=q)], tokenize=False, add_generation_prompt=True) for q in qs],
          return_tensors="pt", padding=True, add_special_tokens=False)
out = m.generate(**enc, max_new_tokens=24, do_sample=False)[:, enc["input_ids"].shape[1]:]
end = tok.convert_tokens_to_ids("<|end|>")
print(json.dumps([end in row.tolist() for row in out]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [True, True, True]
    m = json.loads((d/"metrics.json").read_text())
    assert m["method"] == name and m["held_out"]["gold"] > 0 and m["history"]
