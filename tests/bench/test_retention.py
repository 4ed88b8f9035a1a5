"""bench/retention.py: the KL / accuracy math on synthetic logits, the data file, the adapter checks, and
one slow run on the real Gemma-3-270M (a zero-initialised adapter changes nothing, a random one does)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_retention", BENCH / "retention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


ret = _load_bench_module()


# --- KL and agreement ----------------------------------------------------------------------------------


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(5, 1000) * 4
    assert torch.equal(ret.token_kl(logits, logits.clone()), torch.zeros(5, dtype=torch.float64))


def test_kl_ignores_a_constant_shift_of_the_logits():
    logits = torch.randn(3, 50)
    assert ret.token_kl(logits, logits + 7.5).max() < 1e-12


def test_kl_by_hand():
    # p = (0.5, 0.5), q = (0.9, 0.1): 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108256...
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert ret.token_kl(p, q).item() == pytest.approx(expected, abs=1e-6)
    # KL is not symmetric: KL(q || p) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.3680642...
    assert ret.token_kl(q, p).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-6)


@given(
    st.lists(st.floats(-20, 20), min_size=2, max_size=12).flatmap(
        lambda a: st.tuples(st.just(a), st.lists(st.floats(-20, 20), min_size=len(a), max_size=len(a)))
    )
)
def test_kl_matches_torch_kl_div_and_is_non_negative(pair):
    a, b = (torch.tensor([x], dtype=torch.float64) for x in pair)
    ours = ret.token_kl(a, b)
    reference = torch.nn.functional.kl_div(
        torch.log_softmax(b, -1), torch.log_softmax(a, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert ours.item() >= 0
    assert ours.item() == pytest.approx(max(reference.item(), 0.0), abs=1e-9)


def test_top1_agreement_per_position():
    base = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tuned = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 1.0]])
    assert ret.top1_agree(base, tuned).tolist() == [True, False]


def test_pick_log_probs_reads_the_target_tokens():
    log_probs = ret.log_softmax64(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    picked = ret.pick_log_probs(log_probs, torch.tensor([1, 0]))
    assert picked.tolist() == pytest.approx([math.log(0.5), math.log(0.75)])


# --- the summaries ---------------------------------------------------------------------------------------


def test_percentile_matches_numpy():
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 95, 100):
        assert ret.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_text_figures():
    kl = [0.0, 0.1, 0.2, 0.3]
    figures = ret.text_figures(kl, [True, True, False, True], [math.log(0.5)] * 4, [math.log(0.25)] * 4, passages=2)
    assert figures.kl_mean == pytest.approx(0.15)
    assert figures.kl_median == pytest.approx(0.15)
    assert figures.kl_max == 0.3
    assert figures.top1_agreement == 0.75
    assert figures.base_perplexity == pytest.approx(2.0)
    assert figures.tuned_perplexity == pytest.approx(4.0)
    with pytest.raises(ValueError):
        ret.text_figures([0.1], [True, False], [0.0], [0.0], passages=1)


def test_length_normalisation_changes_the_pick():
    short = ret.ChoiceScore(total=-2.0, tokens=1)  # one unlikely token
    long = ret.ChoiceScore(total=-3.0, tokens=3)  # three likely ones: -1 nat each
    assert long.mean == -1.0
    assert ret.pick([short, long], normalise=False) == 0
    assert ret.pick([short, long], normalise=True) == 1


def test_accuracy_counts_changed_fixed_and_broken():
    q = ret.Question("p", (" a", " b"), 0)
    good, bad = ret.ChoiceScore(-1.0, 1), ret.ChoiceScore(-5.0, 1)
    results = [
        ret.QuestionResult(q, (good, bad), (good, bad)),  # right, stays right
        ret.QuestionResult(q, (good, bad), (bad, good)),  # broken
        ret.QuestionResult(q, (bad, good), (good, bad)),  # fixed
        ret.QuestionResult(q, (bad, good), (bad, good)),  # wrong, stays wrong
    ]
    acc = ret.accuracy(results, normalise=False)
    assert (acc.questions, acc.base_correct, acc.tuned_correct, acc.changed, acc.fixed, acc.broken) == (
        4,
        2,
        2,
        2,
        1,
        1,
    )
    assert ret.mean_correct_logprob(results) == (-3.0, -3.0)


def test_chunks_bound_the_scored_positions_and_keep_the_order():
    rows = [ret.Row(list(range(n + 1)), 0, n) for n in (3, 4, 2, 9, 1)]
    groups = ret.chunks(rows, max_positions=6)
    assert [r for g in groups for r in g] == rows
    assert [[r.end - r.start for r in g] for g in groups] == [[3], [4, 2], [9], [1]]  # an oversize row goes alone
    assert ret.Row([2, 10, 11, 12], 1, 3).targets == [11, 12]


# --- the data file ---------------------------------------------------------------------------------------


def test_the_shipped_data_is_well_formed():
    data = ret.load_data()
    assert 20 <= len(data.passages) <= 40
    assert 35 <= len(data.questions) <= 50
    assert len(set(data.passages)) == len(data.passages)
    assert len({q.prompt for q in data.questions}) == len(data.questions)
    words = " ".join(data.passages).lower()
    assert not any(w in words for w in ("robot", "gripper", "end effector")), "general text only"
    for q in data.questions:
        assert not q.prompt.endswith(" ") and all(c.startswith(" ") and c.strip() for c in q.choices), q
    # the right answer is not always in the same slot
    assert len({q.answer for q in data.questions}) == max(len(q.choices) for q in data.questions)
    assert data.first(2, 3) == ret.RetentionData(data.passages[:2], data.questions[:3])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["questions"][0].update(answer=4), "question 0 has answer 4"),
        (lambda d: d["questions"][1].update(choices=[" x", " x"]), "question 1 repeats a choice"),
        (lambda d: d.update(passages=[]), "'passages' must be"),
        (lambda d: d.update(questions=[]), "'questions' is empty"),
    ],
)
def test_a_malformed_data_file_is_named(tmp_path, mutate, message):
    raw = json.loads(ret.DATA_FILE.read_text())
    mutate(raw)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ret.RetentionError, match=message):
        ret.load_data(path)


# --- the adapter checks (before any model is loaded) -----------------------------------------------------


def _fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(range(60)))
    return path


def _fake_adapter(folder: Path, card_digests: dict[str, str] | None) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    if card_digests is not None:
        card = {"base_model": {"id": "some-other-model", "kind": "gguf-text", "sha256": card_digests}}
        (folder / "training_card.json").write_text(json.dumps(card))
    return folder


def test_missing_adapter_exits_2_with_one_line(tmp_path, capsys):
    code = ret.main(["--adapter", str(tmp_path / "nope"), "--base", str(_fake_gguf(tmp_path / "b.gguf"))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "does not exist" in err and "demo_recipe.py" in err


def test_adapter_trained_on_another_base_is_refused(tmp_path, capsys):
    from vlm2vla_edge.runtime.files import sha256_file

    base = _fake_gguf(tmp_path / "base.gguf")
    other = _fake_adapter(tmp_path / "other", {"model.gguf": "0" * 64})
    code = ret.main(["--adapter", str(other), "--base", str(base)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "trained on some-other-model" in err
    own = _fake_adapter(tmp_path / "own", {"renamed.gguf": sha256_file(base)})  # same bytes, any name
    assert ret.check_adapter(own, base).path == own
    no_card = _fake_adapter(tmp_path / "no-card", None)  # checked module by module once loaded
    assert ret.check_adapter(no_card, base).path == no_card


def test_a_non_lora_folder_is_refused(tmp_path):
    folder = _fake_adapter(tmp_path / "ia3", None)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ret.RetentionError, match="IA3"):
        ret.check_adapter(folder, _fake_gguf(tmp_path / "b.gguf"))


# --- the real model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_270m_zero_adapter_changes_nothing_and_random_one_does(gemma270m_gguf, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from vlm2vla_edge.train.lora.trainer import load_base

    torch.set_num_threads(2)
    loaded = load_base(gemma270m_gguf)
    model = loaded.model.eval()
    for name, init in (("zero", True), ("random", False)):
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
        peft.save_pretrained(str(tmp_path / name))
        model = peft.unload()
    data = ret.load_data().first(2, 3)

    zero = ret.attach_adapter(model, ret.check_adapter(tmp_path / "zero", gemma270m_gguf))
    report = ret.measure(zero, loaded.tokenizer, data)
    assert report.text.kl_mean < 1e-6 and report.text.kl_max < 1e-6
    assert report.text.top1_agreement == 1.0
    assert report.total.changed == 0 and report.per_token.changed == 0
    assert report.base_correct_logprob == report.tuned_correct_logprob
    assert report.text.positions > 20 and report.total.questions == 3
    assert 1 < report.text.base_perplexity < 1000  # a real language model, not noise (262k-way uniform)
    model = zero.unload()

    noisy = ret.attach_adapter(model, ret.check_adapter(tmp_path / "random", gemma270m_gguf))
    report = ret.measure(noisy, loaded.tokenizer, data)
    assert report.text.kl_mean > 1e-3  # the adapter is really on in the "tuned" pass
    model = noisy.unload()

    # an adapter whose tensors do not fill every LoRA slot (made for another model) is refused
    weights = load_file(str(tmp_path / "random" / "adapter_model.safetensors"))
    del weights[sorted(weights)[0]]
    save_file(weights, str(tmp_path / "random" / "adapter_model.safetensors"))
    with pytest.raises(ret.RetentionError, match="does not fit"):
        ret.attach_adapter(model, ret.check_adapter(tmp_path / "random", gemma270m_gguf))
