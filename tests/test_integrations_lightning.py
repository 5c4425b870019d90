"""classp_fused.integrations.lightning.ContinualCallback with a real Lightning Trainer: a tiny
random-init network, two synthetic tasks, a new Trainer and a new CLASSP (from
configure_optimizers) per task, and a resume from the checkpoint in the middle of the second
task that ends bit for bit where the uninterrupted run ends."""
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from classp_fused import CLASSP, EWC, MAS  # noqa: E402
from classp_fused.integrations.lightning import ContinualCallback  # noqa: E402
from classp_fused.regularizers import StiffnessWarning  # noqa: E402
from helpers import bits  # noqa: E402

BATCHES, BATCH = 4, 8


class Classifier(pl.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return CLASSP(self.parameters(), lr=0.05, threshold=1e-6)


def _loader(task):
    g = torch.Generator().manual_seed(task)
    x = torch.randn(BATCHES * BATCH, 6, generator=g)
    y = torch.randint(0, 3, (BATCHES * BATCH,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _consolidation(task):
    return list(_loader(10 + task))[:2]


def _trainer(root, callbacks, **kwargs):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1,
                                               save_on_train_epoch_end=True)
    options = dict(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, deterministic=True)
    return pl.Trainer(callbacks=[checkpoints, *callbacks], **{**options, **kwargs})


def _record_step_norms(module) -> list:
    """Make ``module`` build a CLASSP that records the gradient norm each step sees: after
    Lightning's closure, penalty and clipping."""
    norms = []

    class Recording(CLASSP):
        def step(self, closure=None):
            with torch.enable_grad():
                loss = closure()
            norms.append(float(torch.cat([p.grad.float().flatten()
                                          for p in module.parameters()]).norm()))
            super().step()
            return loss

    module.configure_optimizers = lambda: Recording(module.parameters(), lr=0.05, threshold=1e-6)
    return norms


def _snapshot(module, trainer, regularizer):
    optimizer = trainer.optimizers[0]
    return {"params": {n: bits(p).clone() for n, p in module.named_parameters()},
            "accumulators": {n: bits(optimizer.state[p]["accumulator"]).clone()
                             for n, p in module.named_parameters()},
            "steps": {n: optimizer.state[p]["step"].clone() for n, p in module.named_parameters()},
            "importance": {n: bits(t).clone() for n, t in regularizer.importance.items()}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    module = Classifier()
    ewc = EWC(module.net, lam=10.0)
    callback = ContinualCallback(ewc, data=_consolidation)
    for task in range(2):
        trainer = _trainer(root / f"task{task}", [callback])
        trainer.fit(module, _loader(task))
    return root, module, ewc, callback, trainer


def test_new_trainer_continues_the_accumulators(uninterrupted):
    _, module, ewc, callback, trainer = uninterrupted
    assert callback.run.tasks_done == 2 and ewc.tasks_seen == 2
    steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {4.0 * BATCHES}  # two tasks of two epochs of BATCHES steps


def test_resume_mid_second_task_is_bit_identical(uninterrupted):
    root, module, ewc, _, trainer = uninterrupted
    expected = _snapshot(module, trainer, ewc)
    resumed = Classifier(seed=1)  # weights, optimizer and regularizer all come from the file
    resumed_ewc = EWC(resumed.net, lam=10.0)
    callback = ContinualCallback(resumed_ewc, data=_consolidation)
    resumed_trainer = _trainer(root / "resumed", [callback])
    checkpoint = root / "task1" / f"epoch=0-step={BATCHES}.ckpt"
    resumed_trainer.fit(resumed, _loader(1), ckpt_path=str(checkpoint))
    assert callback.run.tasks_done == 2
    actual = _snapshot(resumed, resumed_trainer, resumed_ewc)
    for key in expected:
        for name in expected[key]:
            assert torch.equal(actual[key][name], expected[key][name]), (key, name)


def test_the_modules_optimizer_passes_classps_attributes_through(tmp_path):
    """As docs/INTEGRATIONS.md says: self.optimizers() is Lightning's wrapper of the CLASSP
    that trainer.optimizers[0] is, with CLASSP's own attributes."""
    seen = []

    class Inspecting(Classifier):
        def training_step(self, batch, batch_index):
            optimizer = self.optimizers()
            seen.append((optimizer is not self.trainer.optimizers[0],
                         isinstance(optimizer, CLASSP), optimizer.backend,
                         optimizer.last_update_fraction))
            return super().training_step(batch, batch_index)

    trainer = _trainer(tmp_path, [], max_epochs=1)
    trainer.fit(Inspecting(), _loader(0))
    assert type(trainer.optimizers[0]) is CLASSP and len(seen) == BATCHES
    assert all(wrapped and is_classp for wrapped, is_classp, _, _ in seen)
    assert {backend for _, _, backend, _ in seen} == {trainer.optimizers[0].backend}
    assert all(0 < fraction <= 1 for _, _, _, fraction in seen[1:])  # the previous step's


def test_penalty_once_per_step_after_clipping_with_accumulation(tmp_path, monkeypatch):
    from classp_fused import optim

    module = Classifier()
    mas = MAS(module.net, lam=1e4)
    callback = ContinualCallback(mas, data=_consolidation)
    _trainer(tmp_path / "a", [callback], max_epochs=1).fit(module, _loader(0))
    with torch.no_grad():  # move away from the anchor: a large penalty gradient
        for p in module.parameters():
            p.add_(0.1)
    step_norms = _record_step_norms(module)
    penalized = []  # per CLASSP kernel call, whether it took the penalty
    run_backend = optim.run_backend
    monkeypatch.setattr(optim, "run_backend", lambda name, *args: (
        penalized.append(args[-1].penalty is not None), run_backend(name, *args))[1])
    _trainer(tmp_path / "b", [callback], max_epochs=1, accumulate_grad_batches=2,
             gradient_clip_val=0.5).fit(module, _loader(1))
    assert penalized == [True] * len(step_norms) and len(step_norms) == BATCHES // 2
    assert max(step_norms) <= 0.5 * (1 + 1e-5)  # the loss gradient was clipped


class ClippedClassifier(Classifier):
    """Lightning refuses gradient_clip_val for an optimizer that unscales inside its step
    (CLASSP) under any mixed precision, bf16 included; the documented workaround clips in the
    hook, after unscaling where a scaler is in use."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        if gradient_clip_val:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)


class PenaltyOnly(Classifier):
    """A zero loss: the gradients are the penalty's alone, also under fp16 autocast."""

    def training_step(self, batch, batch_index):
        return self.net(batch[0]).float().sum() * 0.0


def test_16_mixed_penalty_at_the_scalers_scale_takes_the_fp32_step(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    def run(name, plugins):
        module = PenaltyOnly()
        mas = MAS(module.net, lam=10.0)
        callback = ContinualCallback(mas, data=_consolidation)
        _trainer(tmp_path / name / "a", [callback], max_epochs=1,
                 plugins=plugins).fit(module, _loader(0))
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1)
        _trainer(tmp_path / name / "b", [callback], max_epochs=1,
                 plugins=plugins).fit(module, _loader(1))
        return module

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled = run("16-mixed", [MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() == 2.0 ** 10
    for p, q in zip(scaled.parameters(), run("32", []).parameters()):
        assert torch.equal(bits(p), bits(q))


def test_bf16_with_clipping_through_configure_gradient_clipping(tmp_path):
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _trainer(tmp_path / "refused", [], max_epochs=1, precision="bf16-mixed",
                 gradient_clip_val=0.5).fit(Classifier(), _loader(0))
    module = ClippedClassifier()
    callback = ContinualCallback(MAS(module.net, lam=1e4), data=_consolidation)
    norms = _record_step_norms(module)
    for task in range(2):
        _trainer(tmp_path / str(task), [callback], max_epochs=1, precision="bf16-mixed",
                 gradient_clip_val=0.5).fit(module, _loader(task))
    assert callback.run.tasks_done == 2 and len(norms) == 2 * BATCHES
    assert max(norms) <= 0.5 * (1 + 1e-5)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class Decaying(Classifier):
    """CLASSP with a per-step linear decay of the lr to 0 at the end of one epoch."""

    def configure_optimizers(self):
        optimizer = CLASSP(self.parameters(), lr=0.05, threshold=1e-6)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / BATCHES)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule,
                                                         "interval": "step"}}


def test_the_stiffness_check_runs_at_the_tasks_peak_lr_under_a_decayed_schedule(tmp_path):
    module = Decaying()
    ewc = EWC(module.net, lam=1e4)
    callback = ContinualCallback(ewc, data=_consolidation)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    with pytest.warns(StiffnessWarning, match="explicit penalty step is unstable") as record:
        trainer.fit(module, _loader(0))
    record = [w for w in record if issubclass(w.category, StiffnessWarning)]
    optimizer = trainer.optimizers[0]
    assert len(record) == 1 and optimizer.param_groups[0]["lr"] == 0.0
    assert all(b.stiffness == 0 for b in ewc.stability_bounds(optimizer).values())
    worst = max(ewc.stability_bounds(optimizer, lr=0.05).values(), key=lambda b: b.stiffness)
    assert f"{worst.stiffness:.3g}" in str(record[0].message)


def test_the_proximal_option_takes_the_proximal_form_in_the_step(tmp_path, monkeypatch):
    from classp_fused import optim

    module = Classifier()
    callback = ContinualCallback(MAS(module.net, lam=1e4), data=_consolidation,
                                 penalty="proximal")
    forms = []  # per CLASSP kernel call, the form of the penalty it took
    run_backend = optim.run_backend
    monkeypatch.setattr(optim, "run_backend", lambda name, *args: (
        forms.append(getattr(args[-1].penalty, "form", None)), run_backend(name, *args))[1])
    for task in range(2):
        forms.clear()
        with pytest.warns(StiffnessWarning, match="stays stable"):
            _trainer(tmp_path / str(task), [callback], max_epochs=1).fit(module, _loader(task))
    assert forms == ["proximal"] * BATCHES
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_one_optimizer_only(tmp_path):
    class Two(Classifier):
        def configure_optimizers(self):
            return [CLASSP(self.net[0].parameters(), lr=0.1),
                    CLASSP(self.net[3].parameters(), lr=0.1)]

        def training_step(self, batch, batch_index):
            return None

    module = Two()
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="supports one optimizer"):
        _trainer(tmp_path, [ContinualCallback()], max_epochs=1).fit(module, _loader(0))


def test_default_consolidation_data_is_the_training_loader(tmp_path):
    module = Classifier()
    mas = MAS(module.net, lam=1.0)
    callback = ContinualCallback(mas)
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, _loader(0))
    expected = MAS(Classifier().net, lam=1.0)
    expected.model.load_state_dict(module.net.state_dict())
    expected.consolidate(_loader(0))
    assert all(torch.equal(mas.importance[n], t) for n, t in expected.importance.items())
