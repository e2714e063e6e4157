"""The batch pipeline (osslbench.data.pipeline): one table of views, the documented draw order, the pool map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osslbench.data import pipeline as P
from osslbench.data.augment import normalize, random_crop_flip
from osslbench.data.dataset import RunData
from osslbench.data.randaugment import rand_augment
from osslbench.registry import methods


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=_gen(seed))


def _data(padding: int = 2) -> RunData:
    return RunData(labelled_x=_images(10, 1), labelled_y=torch.arange(10) % 3, unlabelled_x=_images(13, 2),
                   unlabelled_unseen=torch.zeros(13, dtype=torch.bool), test_x=_images(4, 3),
                   test_y=torch.zeros(4, dtype=torch.long), outlier_x=_images(2, 4), num_classes=3,
                   mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_padding=padding, flip=True)


class _Asker(torch.nn.Module):
    """What the pipeline reads of a method: its views and its selection."""

    labelled_views = ("weak",)
    unlabelled_views = ("weak", "strong")
    selected_views = ("flip", "plain")
    padding_mode = "constant"

    def selection(self) -> torch.Tensor:
        return torch.tensor([1, 4, 6, 11])


def test_every_view_kind_is_in_one_table() -> None:
    assert set(P.VIEW_KINDS) == {"plain", "weak", "flip", "strong"} and P.VIEW_KINDS == tuple(P.VIEWS)
    x = _images(6, 0)
    plain, weak, flip, strong = P.views(x, ["plain", "weak", "flip", "strong"], _gen(5), padding=3, flip=True)
    gen = _gen(5)
    assert plain is x
    assert torch.equal(weak, random_crop_flip(x, gen, padding=3, flip=True))
    assert torch.equal(flip, random_crop_flip(x, gen, padding=0, flip=True))  # flipped, never cropped
    assert torch.equal(strong, rand_augment(random_crop_flip(x, gen, padding=3, flip=True), gen))
    assert torch.equal(P.view("flip", x, _gen(7), 3, True), random_crop_flip(x, _gen(7), padding=0, flip=True))
    gen = _gen(9)
    before = gen.get_state()
    with pytest.raises(ValueError, match="medium"):
        P.views(x, ["weak", "medium"], gen, padding=3, flip=True)
    assert torch.equal(gen.get_state(), before)  # an unknown kind fails before any draw


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_asks_for_known_views(name) -> None:
    cls = methods()[name]
    assert set(cls.unlabelled_views) | set(cls.selected_views) <= set(P.VIEW_KINDS)


def test_index_stream_is_concatenated_permutations() -> None:
    gen = _gen(3)
    got = P.index_stream(5, 3, 4, gen)  # 12 indices: three permutations of 5, cut
    ref = _gen(3)
    expected = torch.cat([torch.randperm(5, generator=ref) for _ in range(3)])[:12].view(4, 3)
    assert torch.equal(got, expected)
    assert all(sorted(got.flatten()[k:k + 5].tolist()) == [0, 1, 2, 3, 4] for k in (0, 5))


def test_batches_draw_in_the_documented_order() -> None:
    """Batch i of epoch e, rebuilt by hand from a generator seeded with (seed, e): labelled stream, unlabelled
    stream, selected stream, then per step the labelled weak view, the unlabelled views, the selected views."""
    data, seed, epoch, b, n_ulb, steps = _data(), 11, 2, 4, 3, 3
    pipe = P.BatchPipeline(data, seed, b, steps, 5, n_ulb, torch.device("cpu"))
    got = list(pipe.batches(epoch, _Asker()))
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 1]).generate_state(2, np.uint64)[0] >> 1))

    def stream(n: int, per: int) -> torch.Tensor:
        return torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-per * steps // n))])[:per * steps].view(steps, per)

    lab, ulb = stream(10, b), stream(13, n_ulb)
    sel = torch.tensor([1, 4, 6, 11])[stream(4, n_ulb)]

    def prep(x: torch.Tensor) -> torch.Tensor:
        return normalize(x, data.mean, data.std)

    assert len(got) == steps
    for i, batch in enumerate(got):
        assert torch.equal(batch.x_lb, prep(random_crop_flip(data.labelled_x[lab[i]], gen, padding=2)))
        assert torch.equal(batch.y_lb, data.labelled_y[lab[i]])
        u = data.unlabelled_x[ulb[i]]
        assert torch.equal(batch.x_ulb[0], prep(random_crop_flip(u, gen, padding=2)))
        assert torch.equal(batch.x_ulb[1], prep(rand_augment(random_crop_flip(u, gen, padding=2), gen)))
        s = data.unlabelled_x[sel[i]]
        assert torch.equal(batch.x_sel[0], prep(random_crop_flip(s, gen, padding=0)))
        assert torch.equal(batch.x_sel[1], prep(s))
        assert torch.equal(batch.idx_ulb, ulb[i]) and torch.equal(batch.idx_sel, sel[i])
        assert (batch.epoch, batch.step, batch.steps_per_epoch, batch.epochs) == (epoch, epoch * steps + i, steps, 5)
    assert torch.equal(got[-1].gen.get_state(), gen.get_state())  # the method's own draws continue the stream


def test_pool_map_covers_the_pool_in_eval_mode_and_restores_the_mode() -> None:
    data = _data()
    pipe = P.BatchPipeline(data, 0, 4, 1, 1, 0, torch.device("cpu"))
    model = torch.nn.BatchNorm2d(3).train()
    seen = []
    out = pipe.pool_map(model, lambda x: (seen.append(model.training), x.mean(dim=(1, 2, 3)))[1], 5, torch.no_grad)
    assert seen == [False, False, False] and model.training  # 13 images in batches of 5
    assert torch.allclose(out, normalize(data.unlabelled_x, data.mean, data.std).mean(dim=(1, 2, 3)))
