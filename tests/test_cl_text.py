"""The generated text stream, its transformer and the synthetic-sentiment benchmark end to end."""
import json

import numpy as np
import pytest
import torch

from classp_fused import EWC, MAS
from classp_fused.cl import text
from classp_fused.cl.experiment import ExperimentConfig, run_experiment
from classp_fused.cl.methods import METHODS
from classp_fused.cl.models import TextTransformer, build_model
from classp_fused.cl.streams import Stream, Task, subsample_stream, validation_stream
from classp_fused.cli import main

BENCHMARK = "synthetic-sentiment"


def small_family_splits(seed: int, count: int = 200):
    family = text.sentiment_family(seed, num_tasks=3)
    rngs = [np.random.default_rng([seed, 1, t]) for t in range(3)]
    return family, [family.split(t, count, rng) for t, rng in enumerate(rngs)]


def shared_only(family) -> np.ndarray:
    """The polarity vector that knows only the shared lexicon."""
    polarity = np.zeros(family.vocab_size, dtype=np.int8)
    polarity[family.shared] = family.polarity[0, family.shared]
    return polarity


# ------------------------------------------------------------------ the generator
def test_a_seed_gives_the_same_stream_and_another_seed_a_different_one():
    first = text.sentiment_stream(7, train_per_task=40, test_per_task=20)
    text._sentiment_arrays.cache_clear()
    again = text.sentiment_stream(7, train_per_task=40, test_per_task=20)
    other = text.sentiment_stream(8, train_per_task=40, test_per_task=20)
    assert first.vocab_size == again.vocab_size == other.vocab_size
    for a, b, c in zip(first.tasks, again.tasks, other.tasks):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
        assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
        assert not torch.equal(a.x_train, c.x_train)
    assert not np.array_equal(text.sentiment_family(7).polarity,
                              text.sentiment_family(8).polarity)


def test_scores_follow_the_documented_grammar():
    family = text.sentiment_family(0)
    good = family.shared[family.polarity[0, family.shared] > 0][0]
    bad = family.shared[family.polarity[0, family.shared] < 0][0]
    not_, very = family.negators[0], family.intensifiers[0]
    filler = family.fillers[0]
    rows = np.array([[good, filler, bad, good, 0, 0],      # +1 - 1 + 1
                     [not_, good, filler, 0, 0, 0],         # -1
                     [very, bad, good, 0, 0, 0],            # -2 + 1
                     [not_, bad, very, good, not_, good]])  # +1 + 2 - 1
    assert family.scores(rows, 0).tolist() == [1, -1, -1, 2]


def test_splits_are_balanced_labelled_by_the_rule_and_padded_on_the_right():
    family, splits = small_family_splits(seed=3)
    for t, (tokens, labels) in enumerate(splits):
        scores = family.scores(tokens, t)
        assert tokens.shape == (200, text.SEQ_LEN) and tokens.dtype == np.int64
        assert (scores != 0).all() and (labels == 2 * t + (scores > 0)).all()
        assert (labels == 2 * t).sum() == (labels == 2 * t + 1).sum() == 100
        lengths = (tokens != text.PAD).sum(1)
        assert (tokens[np.arange(text.SEQ_LEN) >= lengths[:, None]] == text.PAD).all()
        assert lengths.min() >= text.MIN_LENGTH - 1 and lengths.max() <= text.SEQ_LEN
        assert tokens.max() < family.vocab_size
        for other in range(3):   # a task's topic and domain words appear in that task only
            own = np.isin(tokens, np.concatenate([family.topics[other],
                                                  family.domains[other]])).any()
            assert own == (other == t)


def test_tasks_share_a_lexicon_and_grammar_and_differ_on_contested_and_domain_words():
    family, splits = small_family_splits(seed=5)
    contested = family.polarity[:, family.contested]
    assert (family.polarity[:, family.shared] == family.polarity[0, family.shared]).all()
    assert ((contested[1:] != contested[0]).sum(1) == text.CONTESTED_WORDS // 2).all()
    shared = shared_only(family)
    for t, (tokens, labels) in enumerate(splits):
        positive = labels % 2 == 1
        # the rule every task shares labels each task well above chance ...
        assert ((family.scores(tokens, t, shared) > 0) == positive).mean() > 0.7
        # ... and task 0's whole rule is right on task 0 only
        first_rule = ((family.scores(tokens, 0) > 0) == positive).mean()
        assert first_rule == 1.0 if t == 0 else 0.6 < first_rule < 0.9


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="train_per_task"):
        text.sentiment_stream(0, train_per_task=7)
    with pytest.raises(ValueError, match="num_tasks"):
        text.sentiment_family(0, num_tasks=0)


def test_subsampled_and_validation_streams_keep_the_vocabulary():
    stream = text.sentiment_stream(0, train_per_task=40, test_per_task=20)
    for derived in (subsample_stream(stream, 10, 10, 0), validation_stream(stream, 0.25, 0)):
        assert derived.vocab_size == stream.vocab_size
        assert build_model("transformer", derived).tokens.num_embeddings == stream.vocab_size


# ------------------------------------------------------------------ the network
def test_the_transformer_takes_ids_or_a_mapping_and_ignores_masked_positions():
    torch.manual_seed(0)
    model = TextTransformer(vocab_size=30, seq_len=8, num_classes=4).eval()
    ids = torch.randint(1, 30, (5, 8))
    ids[:, 6:] = text.PAD
    mask = ids != text.PAD
    logits = model(ids)
    assert logits.shape == (5, 4)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask.long()), logits)
    other_padding = ids.clone()
    other_padding[:, 6:] = 7
    torch.testing.assert_close(model(other_padding, mask), logits)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 9, dtype=torch.long))


def test_token_and_image_models_refuse_the_other_kind_of_stream():
    tokens = text.sentiment_stream(0, train_per_task=40, test_per_task=20)
    image = torch.zeros(4, 1, 8, 8)
    images = Stream("images", (Task("t", (0, 1), image, torch.arange(4) % 2, image,
                                     torch.arange(4) % 2),), 2)
    with pytest.raises(ValueError, match="reads token ids"):
        build_model("transformer", images)
    with pytest.raises(ValueError, match="reads images"):
        build_model("mlp", tokens)


@pytest.mark.parametrize("regularizer", [
    lambda m: MAS(m, lam=1.0, per_sample=False),
    lambda m: EWC(m, lam=1.0, fisher="empirical", per_sample=True)])
def test_consolidate_takes_id_batches_and_mapping_batches_alike(regularizer):
    stream = text.sentiment_stream(0, train_per_task=40, test_per_task=20)
    task = stream.tasks[0]
    torch.manual_seed(0)
    model = build_model("transformer", stream)
    x, y = task.x_train[:16], task.y_train[:16]
    as_ids = regularizer(model)
    as_ids.consolidate([(x[:8], y[:8]), (x[8:], y[8:])])
    as_mapping = regularizer(model)
    as_mapping.consolidate([{"input_ids": x[i:i + 8], "attention_mask": x[i:i + 8] != 0,
                             "labels": y[i:i + 8]} for i in (0, 8)])
    assert model.training
    for name, importance in as_ids.importance.items():
        torch.testing.assert_close(as_mapping.importance[name], importance)
        assert torch.isfinite(importance).all()
    attention = as_ids.importance["encoder.layers.0.self_attn.in_proj_weight"]
    assert attention.abs().sum() > 0


# ------------------------------------------------------------------ the benchmark
def test_every_method_runs_the_benchmark_task_incrementally(tmp_path):
    result = run_experiment(ExperimentConfig(
        benchmarks=(BENCHMARK,), methods=tuple(METHODS), seeds=(0,), epochs=(1,),
        max_per_task=16, out=str(tmp_path / "out"), progress=False, plots=False))
    summary = result.results[BENCHMARK]
    assert set(summary["methods"]) == set(METHODS)
    for name, method in summary["methods"].items():
        assert method["finished_seeds"] == [0], name
        matrix = method["acc_matrix"]["mean"]
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
        for metric in ("avg_acc", "bwt", "forgetting", "own_acc", "state_bytes"):
            assert method[metric]["mean"] is not None, (name, metric)
        assert ("update_density" in method) == name.startswith("classp"), name
    cell = json.loads((tmp_path / "out/cells" / BENCHMARK / "sgd/seed0.json").read_text())
    assert cell["tasks"] == [f"domain {t}" for t in range(5)]
    assert f"| {BENCHMARK} | classp+mas | 1 |" in result.table


def test_the_cli_runs_the_benchmark_class_incrementally(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--benchmark", BENCHMARK, "--methods", "classp,mas", "--seeds", "1",
                 "--epochs", "1", "--max-per-task", "16", "--scenario", "class",
                 "--out", str(out)]) == 0
    assert f"| {BENCHMARK} | classp | 1 |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["scenario"] == "class"
    matrix = results["benchmarks"][BENCHMARK]["methods"]["mas"]["acc_matrix"]["mean"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert (out / "plots" / f"{BENCHMARK}-acc-matrix.png").stat().st_size > 0
