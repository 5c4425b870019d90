"""consolidate(data, forward=..., labels=...): mapping batches, user model calls, labels taken
from the batch, model outputs with .logits, and transformers models with attention masks."""
import os

import pytest
import torch
from torch import nn

from classp_fused import EWC, MAS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = [
    (MAS, {}), (MAS, {"per_sample": True}), (MAS, {"local": True}),
    (EWC, {"lam": 1.0}), (EWC, {"lam": 1.0, "per_sample": True}),
    (EWC, {"lam": 1.0, "fisher": "exact"}),
    (EWC, {"lam": 1.0, "fisher": "exact", "per_sample": True}),
]


class KeywordModel(nn.Module):
    """Takes keyword arguments and returns a dict, like a transformers model; its LayerNorm
    parameters take the vmap route of per-sample importance, the Linear ones the exact route."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, features, scale=None):
        out = self.net(features)
        return {"logits": out if scale is None else out * scale[:, None]}


def _data(seed=1, sizes=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))
            for n in sizes]


def _importance(cls, kwargs, data, **consolidate_kwargs):
    model = KeywordModel()
    reg = cls(model, **kwargs)
    reg.consolidate(data, **consolidate_kwargs)
    return {name: t for name, t in reg.importance.items()}


def _reference(cls, kwargs, data):
    """Today's form: the plain network on (input, label) tuples."""
    model = KeywordModel()
    reg = cls(model.net, **kwargs)
    reg.consolidate(data)
    return {f"net.{name}": t for name, t in reg.importance.items()}


def _assert_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("cls,kwargs", CONFIGS)
def test_mapping_batches_match_tuple_batches(cls, kwargs):
    data = _data()
    mappings = [{"features": x, "labels": y} for x, y in data]
    _assert_equal(_importance(cls, kwargs, mappings), _reference(cls, kwargs, data))


class Batch:
    """A batch object that is neither a tensor, a sequence nor a mapping."""

    def __init__(self, x, y):
        self.x, self.y = x, y


@pytest.mark.parametrize("cls,kwargs", [c for c in CONFIGS if not c[1].get("per_sample")])
def test_forward_and_labels_callables_take_any_batch(cls, kwargs):
    data = _data()
    custom = [Batch(x, y) for x, y in data]
    actual = _importance(cls, kwargs, custom, forward=lambda model, b: model(b.x),
                         labels=lambda b: b.y)
    _assert_equal(actual, _reference(cls, kwargs, data))


def test_per_sample_needs_batches_it_can_split():
    reg = MAS(KeywordModel(), per_sample=True)
    with pytest.raises(TypeError, match="per_sample=True splits batches"):
        reg.consolidate([Batch(x, y) for x, y in _data()], forward=lambda m, b: m(b.x),
                        labels=lambda b: b.y)
    assert reg.tasks_seen == 0


def test_labels_by_key_and_index():
    data = _data()
    expected = _reference(EWC, {"lam": 1.0}, data)
    swapped = [(y, x) for x, y in data]
    _assert_equal(_importance(EWC, {"lam": 1.0}, swapped, forward=lambda m, b: m(b[1]), labels=0),
                  expected)
    keyed = [{"features": x, "target": y} for x, y in data]
    _assert_equal(_importance(EWC, {"lam": 1.0}, keyed, labels="target"), expected)


def test_mapping_entries_reach_the_model():
    data = _data(sizes=(4,))
    x, _ = data[0]
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0])
    scaled = _importance(MAS, {}, [{"features": x, "scale": scale}])
    plain = _importance(MAS, {}, [{"features": x}])
    assert any(not torch.equal(scaled[n], plain[n]) for n in plain)
    by_hand = _importance(MAS, {}, [x], forward=lambda m, b: m.net(b) * scale[:, None])
    _assert_equal(scaled, by_hand)


def test_bad_forward_and_labels_raise_and_change_nothing():
    model = KeywordModel()
    reg = EWC(model, lam=1.0)
    data = [{"features": torch.randn(3, 6), "labels": torch.tensor([0, 1, 2])}]
    with pytest.raises(TypeError, match="forward must be a callable"):
        reg.consolidate(data, forward="logits")
    with pytest.raises(TypeError, match="labels must be a batch key"):
        reg.consolidate(data, labels=1.5)
    with pytest.raises(ValueError, match="labels='y' names no entry"):
        reg.consolidate(data, labels="y")
    with pytest.raises(TypeError, match="must return logits"):
        reg.consolidate(data, forward=lambda m, b: [m(b["features"])])
    with pytest.raises(ValueError, match="fisher='empirical'"):
        reg.consolidate([{"features": torch.randn(3, 6)}])
    assert reg.tasks_seen == 0


# ------------------------------------------------------------------ transformers models
@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _token_batch(seed, n=4, length=8, pad_from=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, pad_from:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 3, (n,), generator=g)}


@pytest.mark.parametrize("cls,kwargs", [(MAS, {}), (EWC, {"lam": 1.0}),
                                        (EWC, {"lam": 1.0, "fisher": "exact"})])
def test_transformers_model_without_a_wrapper(bert, cls, kwargs):
    data = [_token_batch(1), _token_batch(2)]
    plain = cls(bert, **kwargs)
    plain.consolidate(data)

    def logits(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits

    wrapped = cls(bert, **kwargs)
    wrapped.consolidate(data, forward=logits, labels=lambda b: b["labels"])
    _assert_equal(plain.importance, wrapped.importance)


def test_transformers_attention_mask_hides_the_padding(bert):
    # Padded sample with its mask == the same sample unpadded; without the mask it is not.
    padded = _token_batch(3, n=1, pad_from=5)
    padded["attention_mask"][0, 5:] = 0
    short = {key: value[:, :5] if value.dim() == 2 else value for key, value in padded.items()}
    no_mask = {key: value for key, value in padded.items() if key != "attention_mask"}
    importances = []
    for batch in (padded, short, no_mask):
        reg = MAS(bert)
        reg.consolidate([batch])
        importances.append(reg.importance)
    masked, unpadded, unmasked = importances
    for name in unpadded:
        torch.testing.assert_close(masked[name], unpadded[name], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(unmasked[n], unpadded[n], rtol=1e-3) for n in unpadded)


def test_transformers_per_sample_with_masks_says_what_to_do(bert):
    with pytest.raises(RuntimeError, match="per_sample=False on batches of one sample"):
        MAS(bert, per_sample=True).consolidate([_token_batch(4)])
    unmasked = {k: v for k, v in _token_batch(4).items() if k != "attention_mask"}
    per_sample = MAS(bert, per_sample=True)
    per_sample.consolidate([unmasked])
    one_by_one = MAS(bert)
    one_by_one.consolidate([{k: v[i:i + 1] for k, v in unmasked.items()} for i in range(4)])
    for name, t in one_by_one.importance.items():
        torch.testing.assert_close(per_sample.importance[name], t, rtol=1e-4, atol=1e-8)


def test_samples_are_counted_by_the_first_tensor_else_the_labels():
    data = _data(sizes=(5,))
    x, y = data[0]
    by_labels = _importance(MAS, {}, [Batch(x, y)], forward=lambda m, b: m(b.x),
                            labels=lambda b: b.y)
    _assert_equal(by_labels, _reference(MAS, {}, data))
    reg = MAS(KeywordModel())
    with pytest.raises(TypeError, match="cannot count the samples"):
        reg.consolidate([Batch(x, y)], forward=lambda m, b: m(b.x))
    assert reg.tasks_seen == 0
