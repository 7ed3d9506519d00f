"""Metrics checked against hand-computed cases on a model whose probabilities we choose."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from collabedit.evaluate.metrics import (
    counterfact_case_metrics,
    evaluate_requests,
    harmonic_mean,
    ngram_entropy,
    ngram_entropy_of_text,
    summarise_counterfact,
    zsre_case_metrics,
)
from collabedit.evaluate.scoring import score_targets
from collabedit.requests import EditRequest, RelationPrompt

WORDS = [
    "<pad>",
    "<unk>",
    "<|endoftext|>",
    "Ann",
    "Bo",
    "Cy",
    "speaks",
    "French",
    "English",
    "New",
    "York",
    "Paris",
    "in",
    "lives",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>"
    )


class BigramLM(torch.nn.Module):
    """Next-token log-probabilities depend only on the current token: a table we write by hand."""

    def __init__(self, table: dict[str, dict[str, float]]):
        super().__init__()
        logits = torch.full((len(WORDS), len(WORDS)), -30.0)
        for cur, nxt in table.items():
            for word, p in nxt.items():
                logits[WORDS.index(cur), WORDS.index(word)] = math.log(p)
        self.logits = torch.nn.Parameter(logits, requires_grad=False)
        self.config = SimpleNamespace(n_positions=32)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits[input_ids])


def _req(**kw) -> EditRequest:
    base = dict(
        case_id=0, subject="Ann", prompt="{} speaks", target_new="English", target_true="French"
    )
    return EditRequest(**(base | kw))


def test_score_targets_reads_the_right_positions():
    tok = _tokenizer()
    lm = BigramLM(
        {"speaks": {"French": 0.7, "English": 0.2, "New": 0.1}, "New": {"York": 0.5, "Paris": 0.5}}
    )
    french, new_york = score_targets(
        lm, tok, [("Ann speaks", "French"), ("Ann speaks", "New York")]
    )
    assert french.mean_logprob == pytest.approx(math.log(0.7), abs=1e-5)
    assert french.token_correct == (True,)
    # multi-token: mean of log 0.1 and log 0.5; "New" is not the argmax, "York" ties with Paris
    assert new_york.mean_logprob == pytest.approx((math.log(0.1) + math.log(0.5)) / 2, abs=1e-5)
    assert new_york.token_correct[0] is False


def test_pairs_sharing_a_forward_row_score_as_if_each_ran_alone():
    """score_targets runs pairs with one model input (a prompt with two one-token targets, a
    repeated pair, a prompt that ends where another pair's target begins) as one row: each score
    equals the pair's own forward pass of prompt + target[:-1] (float64 model), over
    batches of two rows, and the progress counts every pair once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(WORDS), n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=2,
        eos_token_id=2,
    )
    lm = GPT2LMHeadModel(config).double().eval()
    pairs = [
        ("Ann speaks", "French"),
        ("Ann speaks", "English"),  # same input row as the pair above
        ("Ann speaks", "New York"),  # input "Ann speaks New"
        ("Ann speaks New", "York"),  # the same input, read one position later
        ("Bo lives in", "Paris"),
        ("Ann speaks", "French"),  # a repeated pair
        ("Cy lives in New", "York Paris"),
    ]
    seen = []
    got = score_targets(lm, tok, pairs, batch_size=2, progress=seen.append)
    assert sum(seen) == len(pairs) and len(seen) == 2  # 4 distinct rows in batches of 2
    for (prompt, target), score in zip(pairs, got, strict=True):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + t[:-1]])).logits[0]
        lp = torch.log_softmax(logits[len(p) - 1 :], dim=-1)
        token_lp = lp[torch.arange(len(t)), t]
        # score_targets reads float32 log-probabilities: rounding at 1e-7, a wrong row or
        # position at 1e-1
        assert score.mean_logprob == pytest.approx(float(token_lp.mean()), abs=1e-6)
        assert score.token_correct == tuple(bool(x) for x in lp.argmax(-1) == torch.tensor(t))
    with pytest.raises(ValueError, match="encodes to no tokens"):
        score_targets(lm, tok, [("Ann speaks", " ")])


def test_counterfact_success_compares_mean_logprobs():
    tok = _tokenizer()
    lm = BigramLM(
        {
            "speaks": {"French": 0.3, "English": 0.6, "New": 0.1},
            "lives": {"in": 1.0},
            "in": {"Paris": 0.8, "English": 0.2},
        }
    )
    req = _req(
        paraphrase_prompts=["Bo speaks", "Cy lives"],
        neighborhood_prompts=["Bo speaks", "Cy lives in"],
    )
    [case] = counterfact_case_metrics(lm, tok, [req])
    # rewrite: English 0.6 > French 0.3 -> success
    assert case["rewrite"] == 1.0
    # paraphrases: "Bo speaks" succeeds, "Cy lives" (next is "in" for both targets: tie) fails
    assert case["paraphrase"] == 0.5
    # neighbourhood wants French to stay ahead: "Bo speaks" fails; after "in" French has
    # p=e^-30 < English 0.2 -> fails too
    assert case["neighborhood"] == 0.0
    summary = summarise_counterfact([case])
    assert summary["ES"] == 100.0 and summary["PS"] == 50.0 and summary["NS"] == 0.0
    assert summary["Score"] == 0.0  # harmonic mean with a zero


def test_counterfact_needs_target_true():
    with pytest.raises(ValueError, match="target_true"):
        counterfact_case_metrics(BigramLM({}), _tokenizer(), [_req(target_true=None)])


def test_zsre_token_accuracy_averages_over_target_tokens():
    tok = _tokenizer()
    lm = BigramLM(
        {
            "speaks": {"New": 0.6, "French": 0.4},
            "New": {"Paris": 0.9, "York": 0.1},
            "lives": {"in": 1.0},
            "in": {"Paris": 1.0},
        }
    )
    req = _req(
        target_new="New York",
        paraphrase_prompts=["Bo lives"],
        neighborhood_prompts=["Cy lives in"],
        neighborhood_target="Paris",
    )
    [case] = zsre_case_metrics(lm, tok, [req])
    assert case["rewrite"] == 0.5  # "New" right, "York" wrong
    assert case["paraphrase"] == 0.0
    assert case["neighborhood"] == 1.0
    result = evaluate_requests(lm, tok, [req])
    assert result["EA"] == 50.0 and result["NA"] == 100.0 and result["zsRE_Score"] == 0.0


def test_relation_specificity_is_token_accuracy_of_the_kept_answers():
    tok = _tokenizer()
    lm = BigramLM(
        {"speaks": {"English": 0.9, "French": 0.1}, "lives": {"in": 1.0}, "in": {"Paris": 1.0}}
    )
    kept = RelationPrompt(prompt="Ann lives", answer="in Paris")  # both tokens top-1
    lost = RelationPrompt(prompt="Ann lives in", answer="New York")  # neither
    half = RelationPrompt(prompt="Ann lives", answer="in York")  # "in" right, "York" wrong
    reqs = [
        _req(case_id=0, relation_prompts=[kept, lost]),  # 2 of 4 tokens
        _req(case_id=1, relation_prompts=[half]),  # 1 of 2
        _req(case_id=2),  # no relation prompts: does not count
    ]
    cases = zsre_case_metrics(lm, tok, reqs)
    assert [c["relation"] for c in cases] == [0.5, 0.5, None]
    result = evaluate_requests(lm, tok, reqs)
    assert result["RS"] == 50.0
    assert result["ES"] == 100.0  # RS is reported beside the Scores, not inside them
    assert "RS" not in evaluate_requests(lm, tok, reqs[2:])


def test_ngram_entropy_by_hand():
    # bigrams of "a b a b": (a,b) x2, (b,a) x1; trigrams: (a,b,a), (b,a,b)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy_of_text("a b a b") == pytest.approx((h2 * 2 / 3 + h3 * 4 / 3) / 2)
    assert ngram_entropy(["a b a b", "a a a a"]) == pytest.approx(
        ((h2 * 2 / 3 + h3 * 4 / 3) / 2 + 0.0) / 2
    )


def test_harmonic_mean():
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(200 / 3)
    assert harmonic_mean([0.0, 100.0]) == 0.0
