"""Teacher-output cache: served outputs are bitwise the live forward pass's, so losses and runs are unchanged."""

from __future__ import annotations

import copy
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from osslbench import teacher_cache
from osslbench.config import parse_overrides
from osslbench.data.dataset import load_run_data, make_splits
from osslbench.data.pipeline import view as pipeline_view
from osslbench.device import seeded_init
from osslbench.distill import FeatureDistiller
from osslbench.fsio import RunLock
from osslbench.models import build_model
from osslbench.protocol_loader import load_protocol
from osslbench.registry import get_method, method_config, methods
from osslbench.runner import RunOptions, run_one
from osslbench.teacher_cache import flip_mask
from osslbench.teacher_view_cache import LabelledViewCache, mean_hit_rate
from osslbench.trainer import Schedule, Trainer

# digits with the flip on, so that both cached entries of an image are used
FLIP = ["data.flip=true", "train.epochs=2", "train.teacher_epochs=1", "train.iters_per_epoch=3", "train.last_k=1"]


def _teacher(data, arch: str = "cnn-large") -> torch.nn.Module:
    with seeded_init(7):
        t = build_model(arch, data.num_classes, data.in_channels)
        for mod in t.modules():  # non-trivial BatchNorm statistics: the eval-mode teacher is not an identity
            if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return t


def _trainer(tmp_path: Path, method: str, overrides: list[str], cache_dir: Path | None = None) -> Trainer:
    protocol = load_protocol("digits-openset", None, parse_overrides([*FLIP, *overrides]))
    data = load_run_data(protocol, make_splits(protocol, 0, tmp_path), tmp_path)
    cls = get_method(method)
    cfg, optim = method_config(cls, protocol)
    teacher = _teacher(data)
    with seeded_init(0):
        student = build_model(protocol.models.student, data.num_classes, data.in_channels)
        m = cls(cfg, student, teacher, num_classes=data.num_classes, pool_size=len(data.unlabelled_x),
                labelled_size=len(data.labelled_x), image_size=protocol.data.image_size)
    schedule = Schedule(epochs=2, train=protocol.train, optim=optim, seed=0)
    return Trainer(m, data, schedule, tmp_path / "run", "h", torch.device("cpu"), progress=False, cache_dir=cache_dir)


def _losses(tr: Trainer, batch, state: dict, gen_state: torch.Tensor) -> dict[str, torch.Tensor]:
    """The method's losses on ``batch`` from the method state and generator state given (CRD's memory bank and
    negatives), in the Trainer's precision (under which the caches were built)."""
    tr.method.load_state_dict(state)
    batch.gen.set_state(gen_state)
    with tr.autocast():
        return tr.method.losses(batch)


# every method that declares teacher outputs, in fp32; SRD and KD in bf16 too
DECLARING = sorted(m for m in methods() if get_method(m).teacher_outputs)


@pytest.mark.parametrize(("method", "overrides"), [*[(m, []) for m in DECLARING], ("srd", ["method.srd.alpha=0.5"]),
                                                  ("srd", ["train.amp=true"]), ("kd", ["train.amp=true"])])
def test_losses_are_bitwise_equal_with_and_without_the_cache(tmp_path, method, overrides):
    tr = _trainer(tmp_path, method, overrides)
    record = tr.use_teacher_cache(force=True)
    assert record["used"], record
    assert record["outputs"] == list(tr.method.teacher_outputs)
    assert tr.kernels["teacher_cache_labelled"]["used"], tr.kernels["teacher_cache_labelled"]
    flipped_seen = set()
    for batch in tr.batches(0):
        assert batch.teacher_ulb is not None and batch.teacher_lb is not None
        flipped_seen |= set(batch.flips_ulb[0].tolist())
        # a method's state (CRD's memory bank, its negatives' generator) as it was before the served pass
        state, gen = copy.deepcopy(tr.method.state_dict()), batch.gen.get_state()
        first = _losses(tr, batch, state, gen)  # the labelled views seen for the first time are computed and stored
        hits = tr.labelled_cache.hits
        again = _losses(tr, batch, state, gen)  # now every labelled row is served from the cache
        assert tr.labelled_cache.hits == hits + len(batch.x_lb)
        live = _losses(tr, type(batch)(**{**batch.__dict__, "teacher_ulb": None, "teacher_lb": None}), state, gen)
        for served in (first, again):
            assert served.keys() == live.keys()
            for k in served:
                assert torch.equal(served[k], live[k]), (k, served[k].item(), live[k].item())
    assert flipped_seen == {False, True}  # both entries of the cache were served


def test_the_distillers_of_the_pooled_vector_and_logits_declare_them():
    assert set(DECLARING) >= {"srd", "kd", "dkd", "dist", "crd", "cc", "rkd", "pkt"}
    with pytest.raises(TypeError, match="reads the teacher live"):  # the cache holds no intermediate map

        class MapsFromTheCache(FeatureDistiller):
            layers_key = "layers"
            teacher_outputs = ("pooled", "logits")


def test_flip_mask_records_the_mirrored_images(tmp_path):
    tr = _trainer(tmp_path, "kd", [])
    d = tr.data
    gen = torch.Generator().manual_seed(3)
    idx = torch.arange(len(d.unlabelled_x))[:64]
    raw = d.unlabelled_x[idx]
    view = pipeline_view("flip", raw, gen, padding=0, flip=True)

    mask = flip_mask(view, raw)
    symmetric = (raw == raw.flip(-1)).flatten(1).all(1)
    assert torch.equal(view[mask], raw[mask].flip(-1))
    assert torch.equal(view[~mask], raw[~mask])
    # the view draws its coins with probability 1/2: both outcomes occur among 64 asymmetric images
    assert 10 < int(mask.sum()) < 54 and not symmetric.all()


def test_cache_is_memory_mapped_and_keyed(tmp_path):
    cache_dir = tmp_path / "teacher-cache"
    first = _trainer(tmp_path, "srd", [], cache_dir).use_teacher_cache(force=True)
    assert not first["loaded"] and (cache_dir / f"{first['key']}.pt").exists()
    again = _trainer(tmp_path, "srd", [], cache_dir)
    second = again.use_teacher_cache(force=True)
    assert second["loaded"] and second["key"] == first["key"]
    channels = again.method.teacher.feature_channels[-1]
    assert again.teacher_cache.outputs["pooled"].shape == (2, len(again.data.unlabelled_x), channels)
    assert first["MiB"] == round(2 * len(again.data.unlabelled_x) * channels * 4 / 2**20, 2)  # 2 flips, fp32
    assert first["stored"] == "pooled"
    # KD (logits) and SRD with its KD term (logits + pooled) are served from the same pooled vectors: one file
    for method, overrides in (("kd", []), ("srd", ["method.srd.alpha=0.5"])):
        shared = _trainer(tmp_path, method, overrides, cache_dir).use_teacher_cache(force=True)
        assert shared["used"] and shared["loaded"] and shared["key"] == first["key"], shared
    other = _trainer(tmp_path, "srd", ["train.amp=true"], cache_dir).use_teacher_cache(force=True)
    assert not other["loaded"] and other["key"] != first["key"]  # another precision: another file


def test_a_cache_being_built_elsewhere_is_waited_for_and_loaded(tmp_path):
    """Runs started together: while one builds the pool cache (holding its lock), another waits and then loads the
    file instead of building it a second time."""
    built = _trainer(tmp_path, "srd", [], tmp_path / "elsewhere").use_teacher_cache(force=True)
    cache_dir = tmp_path / "teacher-cache"
    waiter = _trainer(tmp_path, "srd", [], cache_dir)
    records: list[dict] = []
    with RunLock(cache_dir / f".{built['key']}.building", own_temporaries=False):
        thread = threading.Thread(target=lambda: records.append(waiter.use_teacher_cache(force=True)))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not records  # waiting for the builder
        shutil.copy(tmp_path / "elsewhere" / f"{built['key']}.pt", cache_dir)  # the builder's file lands
    thread.join(timeout=60)
    assert records and records[0]["used"] and records[0]["loaded"] and records[0]["key"] == built["key"]
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"{built['key']}.pt"]  # no lock or temporary left


def test_cache_is_off_where_logits_of_the_pooled_vector_differ(tmp_path, monkeypatch):
    derive = teacher_cache.derive
    monkeypatch.setattr(teacher_cache, "derive", lambda teacher, stored, names: {
        k: v + (k == "logits") * 1e-6 for k, v in derive(teacher, stored, names).items()})
    tr = _trainer(tmp_path, "kd", [])
    record = tr.use_teacher_cache(force=True)
    assert not record["used"] and "cached rows differ from the live forward pass" in record["why"], record
    assert tr.teacher_cache is None
    assert _trainer(tmp_path, "srd", []).use_teacher_cache(force=True)["used"]  # SRD reads no logits (alpha = 0)


def test_cache_does_not_apply_or_is_switched_off(tmp_path):
    assert not _trainer(tmp_path, "srd", ["train.teacher_cache=false"]).use_teacher_cache(force=True)["used"]
    cropped = _trainer(tmp_path, "kd", [])
    cropped.method.unlabelled_views = ("weak",)  # a distiller whose unlabelled view is a random crop
    assert "not 'flip'" in cropped.use_teacher_cache(force=True)["why"] and cropped.teacher_cache is None
    assert "no teacher outputs" in _trainer(tmp_path, "fixmatch", []).use_teacher_cache(force=True)["why"]


def test_cache_is_built_only_where_it_pays_off(tmp_path):
    """2 epochs x 3 steps x 32 unlabelled images = 192 teacher forwards live, against 2 x 480 to build the cache."""
    short = _trainer(tmp_path, "srd", [])
    assert short.use_teacher_cache() == {"used": False,
                                         "why": "off (the run's 192 teacher forwards on the pool cost less than "
                                                "the cache's 960)"}
    assert short.teacher_cache is None
    assert _trainer(tmp_path, "srd", ["train.iters_per_epoch=15"]).use_teacher_cache()["used"]  # 960: it pays


def _metrics(folder: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` rows without their timings."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_metrics_equal_with_and_without_the_cache(tmp_path):
    """Two epochs of SRD and KD: every logged figure (losses, top-1, AUROC) is the same with the cache off."""
    for method in ("srd", "kd"):
        rows = {}
        for on in (True, False):
            # 17 steps per epoch: the run's 1,088 unlabelled teacher forwards pay for the pool cache's 2 x 480, and
            # its 1,088 labelled draws exceed the 60 images x 18 crops + flips (padding 1) of the labelled-view cache
            overrides = [*FLIP, "train.iters_per_epoch=17", f"train.teacher_cache={str(on).lower()}"]
            protocol = load_protocol("digits-openset", None, parse_overrides(overrides))
            out = tmp_path / f"{method}-{on}"
            result = run_one(protocol, method, 0, RunOptions(data_root=tmp_path, out=out, progress=False))
            assert result["kernels"]["teacher_cache"]["used"] is on
            labelled = result["kernels"]["teacher_cache_labelled"]
            assert labelled["used"] is on and (not on or 0.3 < labelled["hit_rate"] < 0.7), labelled
            folder = out / "digits-openset" / "full" / method / "seed0"
            rows[on] = _metrics(folder)
        assert rows[True] == rows[False] and len(rows[True]) == 2


# --------------------------------------------------------------------------------------------- labelled-view cache


def test_mean_hit_rate_of_a_run():
    """The paper: 240 epochs x 781 steps x 64 over 50,000 images = 239.9 draws of each image, 162 crops + flips."""
    assert mean_hit_rate(240 * 781 * 64 / 50_000, 162) == pytest.approx(0.4783, abs=1e-4)
    assert mean_hit_rate(5, 162) == pytest.approx(0.0152, abs=1e-4)  # mini scale: 4,000 steps x 64 over 50,000
    assert mean_hit_rate(0, 162) == 0.0 and mean_hit_rate(1e6, 2) == pytest.approx(1.0, abs=1e-5)
    # simulated: uniform draws, a view served when drawn before
    gen = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 162, (2000, 240), generator=gen)
    seen = [len(set(row)) for row in draws.tolist()]
    assert 1 - sum(seen) / draws.numel() == pytest.approx(mean_hit_rate(240, 162), abs=0.005)


def test_mean_hit_rate_after_earlier_runs():
    """The second and third runs of a grid that shares the cache: 88% and 97% at the paper's scale; simulated."""
    d = 240 * 781 * 64 / 50_000
    assert mean_hit_rate(d, 162, prior_draws=d) == pytest.approx(0.8814, abs=1e-4)
    assert mean_hit_rate(d, 162, prior_draws=2 * d) == pytest.approx(0.9730, abs=1e-4)
    gen = torch.Generator().manual_seed(1)
    draws = torch.randint(0, 162, (2000, 480), generator=gen)  # an earlier run's 240 draws, then this run's 240
    served = sum(len(row[240:]) - len(set(row[240:]) - set(row[:240])) for row in draws.tolist())
    assert served / (2000 * 240) == pytest.approx(mean_hit_rate(240, 162, prior_draws=240), abs=0.005)


def _labelled(tr: Trainer, force: bool = False) -> dict:
    """The labelled-view cache's record once the Trainer attached its caches."""
    tr.use_teacher_cache(force)
    return tr.kernels["teacher_cache_labelled"]


def test_labelled_cache_applies_where_it_pays_and_fits(tmp_path, monkeypatch):
    assert "few would be drawn twice" in _labelled(_trainer(tmp_path, "srd", ["train.iters_per_epoch=16"]))["why"]
    assert _labelled(_trainer(tmp_path, "srd", ["train.iters_per_epoch=17"]))["used"]  # 1,088 of 1,080
    off = _trainer(tmp_path, "srd", ["train.teacher_cache=false"])
    assert _labelled(off, force=True)["why"] == "off (train.teacher_cache = false)"
    assert "no teacher outputs" in _labelled(_trainer(tmp_path, "fixmatch", []), force=True)["why"]
    cropped = _trainer(tmp_path, "kd", [])
    cropped.method.unlabelled_views = ("weak",)  # its unlabelled rows go through the teacher live, in one pass
    assert "unlabelled rows go through the teacher live" in _labelled(cropped, force=True)["why"]
    monkeypatch.setattr("osslbench.teacher_view_cache.device_bytes", lambda device: 2**20)  # 256 KiB < 0.5 MiB
    assert "a quarter of the device's memory" in _labelled(_trainer(tmp_path, "srd", []), force=True)["why"]


def test_labelled_cache_is_off_where_smaller_batches_change_the_bits(tmp_path, monkeypatch):
    compute = LabelledViewCache.compute
    monkeypatch.setattr(LabelledViewCache, "compute", lambda self, x: {k: v + (len(x) < 8) * 1e-6
                                                                       for k, v in compute(self, x).items()})
    tr = _trainer(tmp_path, "srd", [])
    record = _labelled(tr, force=True)
    assert not record["used"] and "rows of a smaller batch differ" in record["why"] and tr.labelled_cache is None


def test_labelled_cache_is_off_where_logits_of_the_pooled_vector_differ(tmp_path, monkeypatch):
    outputs = LabelledViewCache.outputs
    monkeypatch.setattr(LabelledViewCache, "outputs", lambda self, pooled: {
        k: v + (k == "logits") * 1e-6 for k, v in outputs(self, pooled).items()})
    record = _labelled(_trainer(tmp_path, "kd", []), force=True)
    assert not record["used"] and "outputs served from stored vectors differ" in record["why"], record
    assert _labelled(_trainer(tmp_path, "srd", []), force=True)["used"]  # SRD reads no logits here (alpha = 0)


def test_a_logits_only_method_stores_logits_where_the_pooled_vectors_would_not_fit(tmp_path, monkeypatch):
    pooled = _labelled(_trainer(tmp_path, "kd", []), force=True)
    assert pooled["used"] and pooled["stored"] == "pooled"
    quarter = int((pooled["MiB"] - 0.1) * 2**20)  # the pooled vectors no longer fit, the logits do
    monkeypatch.setattr("osslbench.teacher_view_cache.device_bytes", lambda device: 4 * quarter)
    tr = _trainer(tmp_path, "kd", [])
    record = _labelled(tr, force=True)
    assert record["used"] and record["stored"] == "logits" and record["MiB"] < pooled["MiB"] / 2, record
    assert record["key"] != pooled["key"]  # not shared with the pooled store
    for batch in list(tr.batches(0))[:2]:
        state, gen = copy.deepcopy(tr.method.state_dict()), batch.gen.get_state()
        served = [_losses(tr, batch, state, gen) for _ in range(2)]  # computed, then served from the store
        live = _losses(tr, type(batch)(**{**batch.__dict__, "teacher_lb": None}), state, gen)
        assert all(torch.equal(s[k], live[k]) for s in served for k in live)
    assert tr.labelled_cache.hits >= len(batch.x_lb)
    assert "a quarter of the device's memory" in _labelled(_trainer(tmp_path, "srd", []), force=True)["why"]
    with pytest.raises(ValueError, match="not logits, pooled from logits"):  # the pooled vector is not in the logits
        LabelledViewCache(tr.method.teacher, ("logits", "pooled"), 4, 162, stored="logits")


def _serve_views(tr: Trainer, steps: int) -> int:
    """Serve the labelled rows of the first ``steps`` batches (filling the cache); the views looked up."""
    n = 0
    with torch.no_grad(), tr.autocast():
        for batch in list(tr.batches(0))[:steps]:
            batch.teacher_lb()
            n += len(batch.idx_lb)
    return n


def test_labelled_views_are_shared_through_shards(tmp_path):
    cache_dir = tmp_path / "teacher-cache"
    first = _trainer(tmp_path, "srd", [], cache_dir)
    assert _labelled(first, force=True)["views_loaded"] == 0
    _serve_views(first, 3)
    stored = int(first.labelled_cache.filled.sum())
    assert first.labelled_cache.save(min_share=1.0) == 0  # fewer than all views: kept for the next call
    assert first.labelled_cache.save() == stored and first.labelled_cache.save() == 0
    (shard,) = list(cache_dir.glob("labelled-*/*.pt"))
    second = _trainer(tmp_path, "srd", [], cache_dir)
    record = _labelled(second, force=True)
    assert record["views_loaded"] == stored and record["key"] == shard.parent.name.removeprefix("labelled-")
    assert torch.equal(second.labelled_cache.filled, first.labelled_cache.filled)
    looked_up = _serve_views(second, 3)  # the same draws: every row served from the shard, none computed
    assert second.labelled_cache.hits == looked_up and not second.labelled_cache.fresh.any()
    # KD reads logits, SRD the pooled vector: one store (logits served as the classifier of the pooled vector)
    kd = _trainer(tmp_path, "kd", [], cache_dir)
    assert _labelled(kd, force=True)["views_loaded"] == stored
    assert kd.labelled_cache.hits == 0 and _serve_views(kd, 3) == kd.labelled_cache.hits
    # another precision is another key: nothing shared
    assert _labelled(_trainer(tmp_path, "srd", ["train.amp=true"], cache_dir), force=True)["views_loaded"] == 0
    # a damaged shard is skipped; a shard whose values differ from the teacher's drops every loaded view
    (shard.parent / "damaged.pt").write_bytes(b"not a shard")
    assert _labelled(_trainer(tmp_path, "srd", [], cache_dir), force=True)["views_loaded"] == stored
    wrong = torch.load(shard, weights_only=True)
    wrong["pooled"][-1, 0] += 1e-3
    torch.save(wrong, shard)
    tampered = _trainer(tmp_path, "srd", [], cache_dir)
    record = _labelled(tampered, force=True)
    assert record["views_loaded"] == 0 and "a stored view differs from the teacher's" in record["shards"]
    assert not tampered.labelled_cache.filled.any()


def test_runs_of_a_grid_share_the_labelled_views_and_stay_exact(tmp_path):
    """KD (reads the teacher's logits) then SRD (its pooled vector) in one --out, as the protocol's default grid
    runs them: SRD loads the pool cache KD built, and with the same seed they draw the same labelled views, so SRD
    finds every one stored and runs no teacher pass at all; its metrics equal SRD's alone."""
    protocol = load_protocol("digits-openset", None, parse_overrides([*FLIP, "train.iters_per_epoch=17"]))
    kernels, pool, rows = {}, {}, {}
    for out, method in (("grid", "kd"), ("grid", "srd"), ("alone", "srd")):
        result = run_one(protocol, method, 0, RunOptions(data_root=tmp_path, out=tmp_path / out, progress=False))
        kernels[out, method], pool[out, method] = result["kernels"]["teacher_cache_labelled"], result["kernels"]["teacher_cache"]
        folder = tmp_path / out / "digits-openset" / "full" / method / "seed0"
        rows[out, method] = _metrics(folder)
    kd, srd, alone = kernels["grid", "kd"], kernels["grid", "srd"], kernels["alone", "srd"]
    assert kd["views_loaded"] == 0 and kd["views_saved"] > 0 and srd["views_loaded"] == kd["views_saved"]
    assert srd["hit_rate"] == 1.0 and srd["views_saved"] == 0, srd
    assert 0.3 < alone["hit_rate"] < 0.7 and alone["views_saved"] == kd["views_saved"], alone
    assert not pool["grid", "kd"]["loaded"] and pool["grid", "srd"]["loaded"] and not pool["alone", "srd"]["loaded"]
    assert rows["grid", "srd"] == rows["alone", "srd"] and len(rows["alone", "srd"]) == 2


def test_a_resumed_run_gets_back_its_labelled_views(tmp_path):
    """Stopped after epoch 1 of 2, then resumed: it loads the shard written at epoch 1 and ends with the
    uninterrupted run's metrics."""
    protocol = load_protocol("digits-openset", None, parse_overrides([*FLIP, "train.iters_per_epoch=17"]))
    rows = {}
    for out, stops in (("whole", [None]), ("resumed", [1, None])):
        for stop in stops:
            result = run_one(protocol, "srd", 0, RunOptions(data_root=tmp_path, out=tmp_path / out, progress=False,
                                                              stop_after=stop))
        folder = tmp_path / out / "digits-openset" / "full" / "srd" / "seed0"
        rows[out] = _metrics(folder)
    labelled = result["kernels"]["teacher_cache_labelled"]
    assert labelled["views_loaded"] > 0.3 * 1080 and labelled["hit_rate"] > 0.5, labelled
    assert rows["resumed"] == rows["whole"] and len(rows["whole"]) == 2
