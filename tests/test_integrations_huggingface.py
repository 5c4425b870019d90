"""classp_fused.integrations.huggingface.ContinualCallback with a real transformers Trainer:
a tiny random-init BERT classifier, two synthetic tasks, a new Trainer per task, and a resume
from a checkpoint in the middle of the second task that ends bit for bit where the
uninterrupted run ends (params, CLASSP accumulators, importances)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import classp_fused  # noqa: E402
from classp_fused import CLASSP, MAS, EWC  # noqa: E402
from classp_fused.integrations.huggingface import ContinualCallback  # noqa: E402
from classp_fused.regularizers import StiffnessWarning  # noqa: E402
from helpers import bits  # noqa: E402

HYPER = {"lr": 0.05, "threshold": 1e-6}
SAMPLES, LENGTH = 24, 8


def _model():
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=LENGTH, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _task(seed):
    """A list of dict samples: token ids with padding and its mask, a label."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(SAMPLES):
        length = int(torch.randint(3, LENGTH + 1, (), generator=g))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:length] = torch.randint(1, 40, (length,), generator=g)
        mask = (torch.arange(LENGTH) < length).long()
        samples.append({"input_ids": ids, "attention_mask": mask,
                        "labels": torch.randint(0, 3, (), generator=g)})
    return samples


def _consolidation_batches(task):
    samples = _task(100 + task)[:8]
    return [transformers.default_data_collator(samples[i:i + 4]) for i in (0, 4)]


def _args(output_dir, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=1,
        save_strategy="steps", save_steps=3, logging_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, **kwargs)


def _trainer(model, callback, output_dir, task, **kwargs):
    return transformers.Trainer(model=model, args=_args(output_dir, **kwargs),
                                train_dataset=_task(task), callbacks=[callback],
                                optimizer_cls_and_kwargs=(CLASSP, HYPER))


def _snapshot(model, trainer, regularizer):
    optimizer = trainer.optimizer.optimizer
    return {"params": {n: bits(p).clone() for n, p in model.named_parameters()},
            "accumulators": {n: bits(optimizer.state[p]["accumulator"]).clone()
                             for n, p in model.named_parameters() if p in optimizer.state},
            "importance": {n: bits(t).clone() for n, t in regularizer.importance.items()}}


def _assert_same(a, b):
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = _model()
    mas = MAS(model, lam=10.0)
    callback = ContinualCallback(mas, data=_consolidation_batches)
    first = _trainer(model, callback, root / "task0", 0)
    first.train()
    after_first = {id(p): first.optimizer.optimizer.state[p]["accumulator"].clone()
                   for p in model.parameters()}
    second = _trainer(model, callback, root / "task1", 1)
    second.train()
    return root, model, mas, callback, second, after_first


def test_new_trainer_continues_the_accumulators(uninterrupted):
    _, model, mas, callback, second, after_first = uninterrupted
    optimizer = second.optimizer.optimizer
    assert callback.run.tasks_done == 2 and mas.tasks_seen == 2
    for p in model.parameters():
        # every element grew from (not restarted below) its end-of-task-0 value
        assert bool((optimizer.state[p]["accumulator"] >= after_first[id(p)]).all())
    assert sum(int((a > 0).sum()) for a in after_first.values()) > 100
    assert float(optimizer.state[next(model.parameters())]["step"]) == 12  # 6 + 6 steps


def test_resume_mid_second_task_is_bit_identical(uninterrupted):
    root, model, mas, callback, second, _ = uninterrupted
    expected = _snapshot(model, second, mas)
    resumed_model, resumed_mas, resumed_callback = _fresh_run()
    trainer = _trainer(resumed_model, resumed_callback, root / "task1", 1)
    trainer.train(resume_from_checkpoint=str(root / "task1" / "checkpoint-3"))
    assert resumed_callback.run.tasks_done == 2
    _assert_same(_snapshot(resumed_model, trainer, resumed_mas), expected)


def test_trainer_optimizer_is_accelerates_wrapper_holding_classp(uninterrupted):
    """As docs/INTEGRATIONS.md says: CLASSP's own attributes are reached through the wrapper."""
    from accelerate.optimizer import AcceleratedOptimizer

    from classp_fused.integrations.continual import unwrap_optimizer

    wrapper = uninterrupted[4].optimizer
    assert type(wrapper) is AcceleratedOptimizer and type(wrapper.optimizer) is CLASSP
    assert unwrap_optimizer(wrapper) is wrapper.optimizer
    assert wrapper.param_groups is wrapper.optimizer.param_groups
    for name in ("backend", "last_update_fraction", "state_bytes"):
        with pytest.raises(AttributeError):
            getattr(wrapper, name)
    assert wrapper.optimizer.backend in classp_fused.available_backends("cpu")
    assert 0 < wrapper.optimizer.last_update_fraction <= 1


def _fresh_run():
    """Model, regularizer and callback as a new process builds them (other weights)."""
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mas = MAS(model, lam=10.0)
    return model, mas, ContinualCallback(mas, data=_consolidation_batches)


def test_resume_from_another_folder_needs_load(uninterrupted, tmp_path):
    import shutil
    root, model, mas, _, second, _ = uninterrupted
    elsewhere = tmp_path / "copied"
    shutil.copytree(root / "task1" / "checkpoint-3", elsewhere)
    resumed_model, _, callback = _fresh_run()
    trainer = _trainer(resumed_model, callback, tmp_path / "out", 1)
    with pytest.raises(FileNotFoundError, match="ContinualCallback.load"):
        trainer.train(resume_from_checkpoint=str(elsewhere))

    resumed_model, resumed_mas, callback = _fresh_run()
    callback.load(str(elsewhere))
    trainer = _trainer(resumed_model, callback, tmp_path / "out", 1)
    trainer.train(resume_from_checkpoint=str(elsewhere))
    _assert_same(_snapshot(resumed_model, trainer, resumed_mas), _snapshot(model, second, mas))


def test_penalty_once_per_optimizer_step_with_accumulation_and_clipping(tmp_path, monkeypatch):
    from classp_fused import optim

    model = _model()
    ewc = EWC(model, lam=10.0)
    penalized = []  # per CLASSP kernel call, whether it took the penalty
    run_backend = optim.run_backend
    monkeypatch.setattr(optim, "run_backend", lambda name, *args: (
        penalized.append(args[-1].penalty is not None), run_backend(name, *args))[1])
    callback = ContinualCallback(ewc, data=_consolidation_batches)
    trainer = _trainer(model, callback, tmp_path / "a", 0, gradient_accumulation_steps=2,
                       max_grad_norm=0.5)
    trainer.train()
    calls = SAMPLES // 4 // 2 * len(trainer.optimizer.optimizer.param_groups)  # a call per group
    assert penalized == [False] * calls  # no penalty before the first consolidation
    penalized.clear()
    _trainer(model, callback, tmp_path / "b", 1, gradient_accumulation_steps=2,
             max_grad_norm=0.5).train()
    assert penalized == [True] * calls
    assert ewc.tasks_seen == 2 and ewc.attached_to is None


@pytest.mark.parametrize("optimizer_cls", [CLASSP, torch.optim.SGD])
def test_penalty_under_a_grad_scaler_takes_the_fp32_step(optimizer_cls):
    # The order of transformers' fp16 step: scaled backward, unscale_ (by the gradient
    # clipping), step. accelerate's AcceleratedOptimizer carries .optimizer and .scaler.
    from types import SimpleNamespace
    from helpers import tiny_model

    def run(scaled):
        model = tiny_model()
        mas = MAS(model, lam=50.0)
        mas.consolidate([torch.randn(16, 6, generator=torch.Generator().manual_seed(3))])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
        optimizer = optimizer_cls(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
        wrapper = SimpleNamespace(optimizer=optimizer, scaler=scaler)
        callback = ContinualCallback(mas)
        callback.on_train_begin(None, SimpleNamespace(global_step=0), None, optimizer=wrapper)
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(torch.randn(8, 6, generator=g)).pow(2).mean()
            if scaled:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e3)
            if scaled:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        return model

    for p, q in zip(run(True).parameters(), run(False).parameters()):
        assert torch.equal(bits(p), bits(q))


def test_default_consolidation_data_is_the_trainers_training_data(tmp_path):
    model = _model()
    ewc = EWC(model, lam=1.0)  # empirical Fisher: labels from the collated batches' "labels"
    callback = ContinualCallback(ewc)
    _trainer(model, callback, tmp_path, 0).train()
    assert ewc.tasks_seen == 1
    assert sum(float(t.sum()) for t in ewc.importance.values()) > 0


def test_the_stiffness_check_runs_at_the_tasks_peak_lr_under_the_decayed_schedule(tmp_path):
    model = _model()
    mas = MAS(model, lam=1e4)
    callback = ContinualCallback(mas, data=_consolidation_batches)
    trainer = _trainer(model, callback, tmp_path, 0)  # the Trainer's default: linear decay to 0
    with pytest.warns(StiffnessWarning, match="explicit penalty step is unstable") as record:
        trainer.train()
    record = [w for w in record if issubclass(w.category, StiffnessWarning)]
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper holds CLASSP
    assert isinstance(optimizer, CLASSP) and len(record) == 1
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    assert all(b.stiffness == 0 for b in mas.stability_bounds(optimizer).values())
    worst = max(mas.stability_bounds(optimizer, lr=HYPER["lr"]).values(),
                key=lambda b: b.stiffness)
    assert f"{worst.stiffness:.3g}" in str(record[0].message)
    assert callback.run.task_lrs is None and not optimizer._optimizer_step_pre_hooks


def test_the_proximal_option_takes_the_proximal_form_in_the_step(tmp_path, monkeypatch):
    from classp_fused import optim

    model = _model()
    callback = ContinualCallback(MAS(model, lam=1e4), data=_consolidation_batches,
                                 penalty="proximal")
    forms = []  # per CLASSP kernel call, the form of the penalty it took
    run_backend = optim.run_backend
    monkeypatch.setattr(optim, "run_backend", lambda name, *args: (
        forms.append(getattr(args[-1].penalty, "form", None)), run_backend(name, *args))[1])
    with pytest.warns(StiffnessWarning, match="stays stable"):
        _trainer(model, callback, tmp_path / "a", 0).train()
    assert set(forms) == {None}  # nothing to apply before the first consolidation
    forms.clear()
    with pytest.warns(StiffnessWarning, match="stays stable"):
        _trainer(model, callback, tmp_path / "b", 1).train()
    assert forms and set(forms) == {"proximal"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_ignored_weight_decay_warning_points_at_the_users_line_not_into_libraries(tmp_path):
    import warnings

    trainer = _trainer(_model(), ContinualCallback(), tmp_path, 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.create_optimizer()
    ignored = [w for w in seen if "CLASSP ignores" in str(w.message)]
    assert len(ignored) == 1
    assert ignored[0].filename == __file__


def test_the_callbacks_stiffness_warning_points_at_the_users_line(tmp_path):
    model = _model()
    callback = ContinualCallback(MAS(model, lam=1e4), data=_consolidation_batches)
    trainer = _trainer(model, callback, tmp_path, 0)
    with pytest.warns(StiffnessWarning) as record:
        trainer.train()
    stiff = [w for w in record if issubclass(w.category, StiffnessWarning)]
    assert [w.filename for w in stiff] == [__file__]


def test_bad_callback_arguments_raise():
    with pytest.raises(TypeError, match="regularizer must be"):
        ContinualCallback(regularizer=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="forward must be"):
        ContinualCallback(forward=3)
    with pytest.raises(ValueError, match="penalty must be one of"):
        ContinualCallback(MAS(_model()), penalty="implicit")
