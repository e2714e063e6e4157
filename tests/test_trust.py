"""Results a reader can trust: precision per machine, the EMA's warm-up, the SSL baselines pinned to their
authors' behaviour (views, padding, schedules, no resampling of a tiny selection), runs labelled truthfully."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import osslbench.hardware as hardware
import osslbench.memory as memory
from osslbench.cli import main
from osslbench.config import parse_overrides
from osslbench.data.dataset import load_run_data, make_splits
from osslbench.data.pipeline import views
from osslbench.ema import EMA
from osslbench.method import Batch, Method
from osslbench.models import build_model
from osslbench.protocol import OptimConfig, lr_factor
from osslbench.protocol_loader import load_protocol
from osslbench.registry import get_method, method_config
from osslbench.runner import RunOptions, run_grid, run_one
from osslbench.trainer import Schedule, Trainer

SMALL = ["train.epochs=2", "train.teacher_epochs=2", "train.iters_per_epoch=3", "train.last_k=1"]


# --- precision -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bf16_only_where_native(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert hardware.use_bf16(cpu, "auto") is native
    assert hardware.use_bf16(cpu, True) is True  # forced
    assert hardware.use_bf16(cpu, False) is False


def test_auto_precision_keeps_fp32_for_networks_too_small_to_gain(monkeypatch, tmp_path):
    """Native bf16 and the digits pair (cnn-small + cnn-large: ~5 MFLOP per image) -> fp32; WRN-16-1 -> bf16."""
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    digits = hardware.forward_mflop([build_model("cnn-small", 6, 1), build_model("cnn-large", 6, 1)], (1, 8, 8))
    wrn = hardware.forward_mflop([build_model("wrn-16-1", 100)], (3, 32, 32))
    assert 1.0 < digits < hardware.BF16_MIN_MFLOP < 50.0 < wrn < 60.0  # WRN-16-1: 53.3 MFLOP per 32 x 32 image
    assert not hardware.use_bf16(cpu, "auto", digits) and hardware.use_bf16(cpu, "auto", wrn)
    assert hardware.use_bf16(cpu, True, digits)  # forced
    result = run_one(load_protocol("digits-openset", "smoke", parse_overrides(SMALL)), "kd", 0,
                     RunOptions(data_root=tmp_path, out=tmp_path, progress=False))
    assert result["precision"] == "fp32" and result["kernels"]["forward_mflop"] == round(digits, 2)


def test_result_records_precision_memory_format_and_hardware(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: False)  # an AVX2-only CPU
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(SMALL))
    result = run_one(protocol, "supervised", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False))
    assert result["precision"] == "fp32" and result["memory_format"] == "channels_last"
    assert result["hardware"]["cpu"] and result["hardware"]["native_bf16"] is False
    assert result["steps"] == 2 * 3
    assert result["memory"]["peak_rss_MiB"] > 50 and result["memory"]["rss_scope"] in ("run", "process")
    forced = load_protocol("digits-openset", "smoke", parse_overrides([*SMALL, "train.amp=true"]))
    assert run_one(forced, "supervised", 0, RunOptions(data_root=tmp_path, out=tmp_path / "b",
                                                       progress=False))["precision"] == "bf16"


def test_each_run_measures_its_own_peak_memory():
    """Runs that follow one another in one process do not inherit an earlier run's peak (Linux resets VmHWM)."""
    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    before = memory.peak(cpu, memory.reset_peak(cpu))["peak_rss_MiB"]
    del big
    scope = memory.reset_peak(cpu)
    after = memory.peak(cpu, scope)["peak_rss_MiB"]
    if scope == "run":
        assert after < before - 300
    else:  # no /proc/self/clear_refs: the process's peak, said so
        assert after >= before


# --- EMA -------------------------------------------------------------------------------------------------------
def test_ema_equals_the_closed_form_of_the_warmup():
    """``e_T = prod_t d_t * e_init + sum_t (1 - d_t) prod_{s > t} d_s * w_t`` with ``d_t = min(d, (1+t)/(10+t))``
    (TensorFlow's ExponentialMovingAverage with num_updates), written out here, not via the recurrence."""
    decay, steps = 0.999, 60
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 5.0)
    ema = EMA(model, decay)
    ws = torch.linspace(-1.0, 2.0, steps).tolist()
    for w in ws:
        model.weight.data.fill_(w)
        ema.update(model)
    d = np.array([min(decay, (1 + t) / (10 + t)) for t in range(steps)])
    after = np.array([np.prod(d[t + 1:]) for t in range(steps)])
    closed = np.prod(d) * 5.0 + np.sum((1 - d) * after * np.array(ws))
    assert float(ema.module.weight) == pytest.approx(closed, rel=1e-5)
    assert int(ema.updates) == steps and ema.current_decay() == pytest.approx(min(decay, 61 / 70))


def test_trainer_ema_warms_up_and_raw_top1_is_reported(tmp_path):
    protocol = load_protocol("digits-openset", "smoke", parse_overrides(SMALL))
    result = run_one(protocol, "fixmatch", 0, RunOptions(data_root=tmp_path, out=tmp_path, progress=False))
    assert "top1_raw_last" in result["metrics"] and "top1_last" in result["metrics"]
    assert result["config"]["method"]["ema_warmup"] is True
    folder = tmp_path / "digits-openset" / "smoke" / "fixmatch" / "seed0"  # the named scale's folder; the label says custom
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("top1" in r and "top1_raw" in r for r in rows)


def _fixmatch_vs_supervised(root, lambda_u: float) -> tuple[list[float], list[float]]:
    protocol = load_protocol("digits-openset", None, {"method": {"fixmatch": {"lambda_u": lambda_u}}})
    results = run_grid(protocol, ["supervised", "fixmatch"], [0, 1, 2],
                       RunOptions(data_root=root, out=root, progress=False, threads=2))
    by = {m: [r["metrics"]["top1_last"] for r in results if r["method"] == m] for m in ("supervised", "fixmatch")}
    return by["supervised"], by["fixmatch"]


@pytest.mark.slow
def test_fixmatch_without_its_unlabelled_term_is_not_penalised_by_its_ema(tmp_path):
    """FixMatch with lambda_u = 0 is a supervised run evaluated through an EMA (0.99 on digits): with the
    warm-up it ends within noise of ``supervised`` (3 seeds), where a cold EMA would lag behind it."""
    sup, fix = _fixmatch_vs_supervised(tmp_path, 0.0)
    noise = 2 * max(np.std(sup), np.std(fix), 1.0)
    assert abs(np.mean(fix) - np.mean(sup)) <= noise, (sup, fix)


# --- the authors' behaviour ------------------------------------------------------------------------------------
def test_cosine_annealing_matches_torch_cosine_annealing_lr_stepped_per_epoch():
    """PseudoLabel / Mean Teacher: the SRD authors' ``CosineAnnealingLR(T_max=epochs, eta_min=1e-4)``, stepped per
    epoch; the reference is torch's own scheduler, run here."""
    epochs, per_epoch, lr = 8, 5, 0.1
    cfg = OptimConfig(lr=lr, schedule="cosine_annealing", lr_min=1e-4)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=1e-4)
    for epoch in range(epochs):
        for k in range(per_epoch):
            step = epoch * per_epoch + k
            assert lr * lr_factor(cfg, step, epochs * per_epoch, per_epoch) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for name in ("pseudolabel", "meanteacher"):
        _, optim = method_config(get_method(name), load_protocol("digits-openset"))
        assert (optim.schedule, optim.lr_min) == ("cosine_annealing", 1e-4)


def test_fixmatch_weight_decay_is_1e_3_on_cifar100_protocols():
    for name in ("cifar100-tinyimagenet", "cifar100-seen50", "cifar100-mismatch", "cifar100-places365"):
        _, optim = method_config(get_method("fixmatch"), load_protocol(name))
        assert optim.weight_decay == 1e-3, name
    assert method_config(get_method("fixmatch"), load_protocol("digits-openset"))[1].weight_decay == 5e-4


def _trainer(tmp_path, method_name: str, **cfg) -> Trainer:
    protocol = load_protocol("digits-openset", None, parse_overrides(SMALL))
    splits = make_splits(protocol, 0, tmp_path)
    data = load_run_data(protocol, splits, tmp_path)
    cls = get_method(method_name)
    config, optim = method_config(cls, protocol)
    for k, v in cfg.items():
        setattr(config, k, v)
    method = cls(config, build_model("cnn-small", data.num_classes, data.in_channels), num_classes=data.num_classes,
                 pool_size=len(data.unlabelled_x))
    return Trainer(method, data, Schedule(2, protocol.train, optim, 0), tmp_path / "run", "h", torch.device("cpu"),
                   progress=False)


def test_openmatch_trains_ce_and_ova_on_two_labelled_views(tmp_path):
    from osslbench.ood import ova_loss

    trainer = _trainer(tmp_path, "openmatch")
    batch = next(trainer.pipeline.batches(0, trainer.method))
    assert len(batch.x_lb_extra) == 1 and not torch.equal(batch.x_lb, batch.x_lb_extra[0])
    m = trainer.method.eval()  # BatchNorm on running statistics: per-image outputs do not depend on the batch
    with torch.no_grad():
        terms = m.losses(batch)
        views = [m.heads(x) for x in (batch.x_lb, batch.x_lb_extra[0])]
    ce = np.mean([nn.functional.cross_entropy(logits, batch.y_lb).item() for logits, _ in views])
    ova = np.mean([ova_loss(open_, batch.y_lb).item() for _, open_ in views])
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["ova"].item() == pytest.approx(ova, rel=1e-5)


class _Selects(Method):
    """A method selecting a fixed subset, to see what the Trainer draws from it."""

    name = ""
    unlabelled_views = ("weak",)
    selected_views = ("weak",)
    subset = torch.arange(3)

    def selection(self) -> torch.Tensor:
        return self.subset

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ce": nn.functional.cross_entropy(self.student(batch.x_lb), batch.y_lb)}


def test_a_selection_smaller_than_a_batch_forms_no_batch(tmp_path):
    """OpenMatch's 37 selected images drawn ~690 times each in one epoch: the authors' drop_last loader forms no
    batch from them (and the SRD authors skip the FixMatch term), so neither does the Trainer."""
    trainer = _trainer(tmp_path, "supervised")
    data, model = trainer.data, trainer.method.student
    for size, expect in ((trainer.s.train.batch_size - 1, False), (trainer.s.train.batch_size + 5, True)):
        m = _Selects(Method.Config(), model, num_classes=data.num_classes)
        m.subset = torch.arange(size)
        t = Trainer(m, data, trainer.s, tmp_path / f"sel{size}", "h", torch.device("cpu"), progress=False)
        batches = list(t.pipeline.batches(0, m))
        assert all(bool(b.x_sel) is expect for b in batches)
        if expect:  # drawn as permutations of the subset, never with replacement inside one pass
            drawn = torch.cat([b.idx_sel for b in batches])[:size]
            assert len(set(drawn.tolist())) == size


@pytest.mark.parametrize(("method", "zeros"), [("supervised", True), ("kd", True), ("fixmatch", False),
                                               ("openmatch", False), ("mixmatch", False)])
def test_weak_view_padding_follows_each_family(tmp_path, method, zeros):
    """Distillers crop with zero padding (RepDistiller); the FixMatch family pads by reflection."""
    x = torch.full((256, 1, 8, 8), 200, dtype=torch.uint8)
    view = views(x, ["weak"], torch.Generator().manual_seed(0), padding=1, flip=False, mode=get_method(method).padding_mode)[0]
    assert bool((view == 0).any()) is zeros


# --- labels and the smoke scale --------------------------------------------------------------------------------
def test_runs_with_overrides_are_labelled_custom_and_carry_their_steps(tmp_path, capsys):
    assert main(["run", "--scale", "smoke", "--methods", "supervised", "--out", str(tmp_path), "--quiet",
                 "--set", "train.epochs=1"]) == 0
    assert main(["run", "--scale", "smoke", "--methods", "supervised", "--out", str(tmp_path / "named"),
                 "--quiet"]) == 0
    custom = (tmp_path / "digits-openset" / "leaderboard.csv").read_text()
    named = (tmp_path / "named" / "digits-openset" / "leaderboard.csv").read_text()
    assert ",smoke+custom," in custom and ",smoke," in named
    import pandas as pd

    assert pd.read_csv(tmp_path / "named" / "digits-openset" / "leaderboard.csv")["steps"].tolist() == [2 * 12]
    assert pd.read_csv(tmp_path / "digits-openset" / "leaderboard.csv")["steps"].tolist() == [12]


def test_smoke_scale_tells_a_learning_method_from_a_broken_one(tmp_path):
    """At smoke (24 steps) the student alone learns well above chance (16.9% = the largest class); with a
    learning rate of 1e-6 (a method that does not learn) it stays at chance."""
    good = run_one(load_protocol("digits-openset", "smoke"), "supervised", 0,
                   RunOptions(data_root=tmp_path, out=tmp_path / "a", progress=False))
    broken = run_one(load_protocol("digits-openset", "smoke", {"optim": {"lr": 1e-6}}), "supervised", 0,
                     RunOptions(data_root=tmp_path, out=tmp_path / "b", progress=False))
    assert good["metrics"]["top1_last"] > broken["metrics"]["top1_last"] + 10
