"""Behaviour of the batch augmentation ops and views (osslbench.data.augment, .randaugment, .pipeline)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from osslbench.data import augment as A
from osslbench.data import pipeline as P
from osslbench.data import randaugment as R


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, c: int = 3, size: int = 32, seed: int = 0, high: int = 256) -> torch.Tensor:
    """Random images, slightly smoothed so that histograms and grey levels look like photographs'."""
    raw = torch.randint(0, high, (n, c, size, size), dtype=torch.uint8, generator=_gen(seed))
    return F.avg_pool2d(raw.float(), 3, 1, 1).round().to(torch.uint8)


def _to_pil(img: torch.Tensor) -> PIL.Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _from_pil(img: PIL.Image.Image) -> torch.Tensor:
    arr = np.array(img)
    return torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)


def _reference(img: torch.Tensor, name: str, m: int, sign: int, fill: int) -> torch.Tensor:
    """The op as the FixMatch reimplementation's RandAugmentMC applies it with PIL (fill instead of black)."""
    im = _to_pil(img)
    fillcolor = fill if im.mode == "L" else (fill,) * 3
    factor = m * 0.9 / 10 + 0.05
    size = im.size
    if name == "Identity":
        out = im
    elif name == "Equalize":
        out = PIL.ImageOps.equalize(im)
    elif name == "Brightness":
        out = PIL.ImageEnhance.Brightness(im).enhance(factor)
    elif name == "Color":
        out = PIL.ImageEnhance.Color(im).enhance(factor)
    elif name == "Contrast":
        out = PIL.ImageEnhance.Contrast(im).enhance(factor)
    elif name == "Sharpness":
        out = PIL.ImageEnhance.Sharpness(im).enhance(factor)
    elif name == "Posterize":
        out = PIL.ImageOps.posterize(im, int(m * 4 / 10) + 4)
    elif name == "Solarize":
        out = PIL.ImageOps.solarize(im, 256 - int(m * 256 / 10))
    elif name == "Rotate":
        out = im.rotate(sign * int(m * 30 / 10), fillcolor=fillcolor)
    elif name == "ShearX":
        out = im.transform(size, PIL.Image.AFFINE, (1, sign * m * 0.3 / 10, 0, 0, 1, 0), fillcolor=fillcolor)
    elif name == "ShearY":
        out = im.transform(size, PIL.Image.AFFINE, (1, 0, 0, sign * m * 0.3 / 10, 1, 0), fillcolor=fillcolor)
    elif name == "TranslateX":
        shift = int(sign * m * 0.3 / 10 * size[0])
        out = im.transform(size, PIL.Image.AFFINE, (1, 0, shift, 0, 1, 0), fillcolor=fillcolor)
    elif name == "TranslateY":
        shift = int(sign * m * 0.3 / 10 * size[1])
        out = im.transform(size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, shift), fillcolor=fillcolor)
    else:
        raise AssertionError(name)
    return _from_pil(out)


# ------------------------------------------------------------------------------------------------- random_crop_flip


def test_crop_flip_dtype_shape_and_identity() -> None:
    x = _images(5)
    out = A.random_crop_flip(x, _gen())
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(A.random_crop_flip(x, _gen(), padding=0, flip=False), x)


def test_crop_flip_deterministic_per_generator() -> None:
    x = _images(16)
    a = A.random_crop_flip(x, _gen(1))
    assert torch.equal(a, A.random_crop_flip(x, _gen(1)))
    assert not torch.equal(a, A.random_crop_flip(x, _gen(2)))
    gen = _gen(3)
    state = gen.get_state()
    first = A.random_crop_flip(x, gen)
    gen.set_state(state)
    assert torch.equal(first, A.random_crop_flip(x, gen))


_CROP_CASES = [(3, 32, 4, "constant"), (1, 8, 2, "constant"), (3, 8, 3, "reflect")]


@pytest.mark.parametrize(("c", "size", "padding", "mode"), _CROP_CASES)
def test_crop_flip_is_a_window_of_the_padded_image(c: int, size: int, padding: int, mode: str) -> None:
    x = torch.randint(1, 256, (24, c, size, size), dtype=torch.uint8, generator=_gen(4))
    out = A.random_crop_flip(x, _gen(5), padding=padding, fill=0, padding_mode=mode)  # type: ignore[arg-type]
    padded = F.pad(x.float(), (padding,) * 4, mode=mode).to(torch.uint8)
    span = 2 * padding + 1
    for i in range(x.shape[0]):
        matches = 0
        for oy in range(span):
            for ox in range(span):
                window = padded[i, :, oy : oy + size, ox : ox + size]
                matches += int(torch.equal(out[i], window)) + int(torch.equal(out[i], window.flip(-1)))
        assert matches == 1, f"sample {i}: {matches} candidate windows match"


@pytest.mark.parametrize(("c", "size", "padding", "mode"), _CROP_CASES)
def test_crop_flip_ids_name_the_window_drawn(c: int, size: int, padding: int, mode: str) -> None:
    """Drawn first, then applied: the same view as random_crop_flip; the id decodes to the window and flip drawn."""
    x = torch.randint(1, 256, (40, c, size, size), dtype=torch.uint8, generator=_gen(4))
    gen = _gen(5)
    draws = A.draw_crop_flip(len(x), gen, padding)
    out = A.random_crop_flip(x, gen, padding=padding, padding_mode=mode, draws=draws)  # type: ignore[arg-type]
    assert torch.equal(out, A.random_crop_flip(x, _gen(5), padding=padding, padding_mode=mode))  # type: ignore[arg-type]
    ids = draws.ids
    assert ids.dtype == torch.int64 and bool(((ids >= 0) & (ids < A.crop_flip_views(padding))).all())
    padded = F.pad(x.float(), (padding,) * 4, mode=mode).to(torch.uint8)
    span = 2 * padding + 1
    for i, v in enumerate(ids.tolist()):
        oy, ox, flipped = v // 2 // span, v // 2 % span, v % 2
        window = padded[i, :, oy : oy + size, ox : ox + size]
        assert torch.equal(out[i], window.flip(-1) if flipped else window)
    assert len(set(ids.tolist())) > 10  # the draws spread over the views
    again = A.CropFlip.from_ids(ids, padding)  # the labelled-view cache rebuilds a stored view from its id
    assert torch.equal(A.random_crop_flip(x, _gen(0), padding=padding, padding_mode=mode, draws=again), out)  # type: ignore[arg-type]
    assert A.crop_flip_views(4) == 162 and A.crop_flip_views(0) == 2
    with pytest.raises(ValueError, match="draws for 40 samples at padding"):
        A.random_crop_flip(x, gen, padding=padding + 1, draws=draws)


def test_crop_flip_fill_value() -> None:
    x = torch.full((64, 1, 8, 8), 200, dtype=torch.uint8)
    out = A.random_crop_flip(x, _gen(), padding=3, fill=7)
    assert set(out.unique().tolist()) == {7, 200}


def test_flip_frequency() -> None:
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(2000, 1, 8, 8)
    out = A.random_crop_flip(x, _gen(6), padding=0)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool(((out == x).flatten(1).all(1) | flipped).all())
    assert abs(flipped.float().mean().item() - 0.5) < 0.05


def test_crop_offsets_cover_the_range_uniformly() -> None:
    n, size, p = 2000, 8, 4
    x = torch.arange(1, size * size + 1, dtype=torch.uint8).view(1, 1, size, size).expand(n, 1, size, size)
    out = A.random_crop_flip(x, _gen(7), padding=p, flip=False).flatten(1)
    pos = (out > 0).to(torch.uint8).argmax(1)  # first pixel from the image (always one: p < size)
    value = out[torch.arange(n), pos].long() - 1
    off_y = value // size - pos // size + p
    off_x = value % size - pos % size + p
    for off in (off_y, off_x):
        counts = torch.bincount(off, minlength=2 * p + 1)
        assert counts.numel() == 2 * p + 1 and bool((counts > 0).all())
        expected = n / (2 * p + 1)
        assert bool(((counts - expected).abs() < 0.35 * expected).all()), counts.tolist()


# ----------------------------------------------------------------------------------------------------- rand_augment


@pytest.mark.parametrize(("c", "size"), [(3, 32), (1, 8)])
def test_rand_augment_dtype_shape_determinism(c: int, size: int) -> None:
    x = _images(32, c, size)
    out = R.rand_augment(x, _gen(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, R.rand_augment(x, _gen(1)))
    assert not torch.equal(out, R.rand_augment(x, _gen(2)))
    assert torch.equal(x, _images(32, c, size)), "the input must not be modified"


def test_rand_augment_per_sample_randomness() -> None:
    x = _images(1).expand(16, 3, 32, 32).contiguous()
    out = R.rand_augment(x, _gen(3), num_ops=2, cutout=0.0)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) >= 8


@pytest.mark.parametrize(("c", "size", "side"), [(3, 32, 16), (1, 8, 4)])
def test_cutout_only(c: int, size: int, side: int) -> None:
    n, fill = 300, 128
    x = _images(n, c, size, high=100)  # no pixel equals the fill
    out = R.rand_augment(x, _gen(4), num_ops=0, cutout=0.5, fill=fill)
    starts = set()
    for i in range(n):
        changed = (out[i] != x[i]).any(0)
        rows = changed.any(1).nonzero().squeeze(1)
        cols = changed.any(0).nonzero().squeeze(1)
        y0, y1, x0, x1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        assert bool(changed[y0:y1, x0:x1].all()) and int(changed.sum()) == (y1 - y0) * (x1 - x0)
        assert bool((out[i][:, changed] == fill).all())
        assert (y1 - y0, x1 - x0) == (min(side, size - y0), min(side, size - x0))
        starts.add((y0, x0))
    assert {y for y, _ in starts} == set(range(size - side // 2)), "every start row of CutoutAbs occurs"


def test_plan_distribution() -> None:
    n = 7000
    [(op, magnitude, sign)] = R._draw_plan(n, 1, _gen(5))
    assert set(magnitude.tolist()) == set(range(1, 11))
    assert set(sign.tolist()) == {-1, 1}
    identity = R.OPS.index("Identity")
    share_identity = (op == identity).float().mean().item()
    assert abs(share_identity - (0.5 + 0.5 / len(R.OPS))) < 0.03  # the 0.5 coin, plus Identity drawn
    counts = torch.bincount(op[op != identity], minlength=len(R.OPS))
    others = counts[torch.arange(len(R.OPS)) != identity].float()
    assert bool((others > 0).all()) and others.max() / others.min() < 1.5


# -------------------------------------------------------------------------------------------------- forced ops


def test_identity_solarize_posterize() -> None:
    x = _images(4)
    assert torch.equal(R.apply_op(x, "Identity", 7), x)
    for m in range(0, 11):
        threshold = 256 - int(m * 256 / 10)
        expected = torch.where(x.int() >= threshold, 255 - x, x)  # x.int(): a uint8 compare would wrap 256
        assert torch.equal(R.apply_op(x, "Solarize", m), expected)
        if threshold <= 255:
            assert torch.equal(R.apply_op(x, "Solarize", m), TF.solarize(x, threshold))
        bits = int(m * 4 / 10) + 4
        out = R.apply_op(x, "Posterize", m)
        assert torch.equal(out, TF.posterize(x, bits))
        assert torch.equal(out, x & ((0xFF << (8 - bits)) & 0xFF))


def test_equalize_and_autocontrast_match_torchvision_per_image() -> None:
    x = _images(6, high=180)
    assert torch.equal(R.apply_op(x, "Equalize", 5), torch.stack([TF.equalize(img) for img in x]))
    assert torch.equal(R.apply_op(x, "AutoContrast", 5), torch.stack([TF.autocontrast(img) for img in x]))


def test_enhance_ops_match_torchvision_within_one_level() -> None:
    x = _images(6)
    for name, fn in [
        ("Brightness", TF.adjust_brightness),
        ("Color", TF.adjust_saturation),
        ("Contrast", TF.adjust_contrast),
        ("Sharpness", TF.adjust_sharpness),
    ]:
        for m in (1, 6, 10):
            ref = fn(x, m * 0.9 / 10 + 0.05)
            assert (R.apply_op(x, name, m).int() - ref.int()).abs().max() <= 1, (name, m)


@pytest.mark.parametrize("name", [op for op in R.OPS if op != "AutoContrast"])
@pytest.mark.parametrize(("c", "size"), [(3, 32), (1, 8)])
def test_ops_match_the_pil_source(name: str, c: int, size: int) -> None:
    """Every op except AutoContrast equals the FixMatch reimplementation's PIL code, pixel for pixel."""
    x = _images(4, c, size)
    for m in (1, 4, 10):
        for sign in (1, -1):
            out = R.apply_op(x, name, m, sign, fill=100)
            ref = torch.stack([_reference(img, name, m, sign, 100) for img in x])
            assert torch.equal(out, ref), (name, m, sign, (out != ref).float().mean().item())


def test_autocontrast_close_to_pil() -> None:
    x = _images(4, high=200)
    ref = torch.stack([_from_pil(PIL.ImageOps.autocontrast(_to_pil(img))) for img in x])
    assert (R.apply_op(x, "AutoContrast", 1).int() - ref.int()).abs().max() <= 1


def test_translate_is_an_integer_shift() -> None:
    x = _images(2)
    out = R.apply_op(x, "TranslateX", 10, 1, fill=128)  # int(0.3 * 32) = 9 px; content moves left
    assert torch.equal(out[..., :-9], x[..., 9:]) and bool((out[..., -9:] == 128).all())
    out = R.apply_op(x, "TranslateY", 5, -1, fill=3)  # int(0.15 * 32) = 4 px; content moves down
    assert torch.equal(out[..., 4:, :], x[..., :-4, :]) and bool((out[..., :4, :] == 3).all())


def test_per_sample_magnitudes_and_signs() -> None:
    x = _images(10)
    mags = torch.arange(1, 11)
    signs = torch.tensor([1, -1] * 5)
    for name in R.OPS:
        out = R.apply_op(x, name, mags, signs)
        for i in range(10):
            assert torch.equal(out[i], R.apply_op(x[i : i + 1], name, int(mags[i]), int(signs[i]))[0]), name


def test_apply_op_rejects_bad_arguments() -> None:
    x = _images(2)
    with pytest.raises(ValueError):
        R.apply_op(x, "Invert", 3)
    with pytest.raises(ValueError):
        R.apply_op(x, "Rotate", 11)
    with pytest.raises(ValueError):
        R.rand_augment(x.float(), _gen())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        R.rand_augment(x, 0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ normalize, rot90


def test_normalize_known_values() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = A.normalize(x, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 2.0))
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected = torch.tensor([0.0, (0.2 - 0.5) / 0.5, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    torch.testing.assert_close(out, expected)
    cl = _images(2).contiguous(memory_format=torch.channels_last)
    assert A.normalize(cl, (0.5,) * 3, (0.25,) * 3).is_contiguous(memory_format=torch.channels_last)


def test_rotate90() -> None:
    x = _images(6, size=8)
    k = torch.tensor([0, 1, 2, 3, 4, -1])
    out = A.rotate90(x, k)
    for i in range(6):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))
    assert torch.equal(A.rotate90(x, torch.full((6,), 4)), x)
    ones = torch.ones(6, dtype=torch.long)
    assert torch.equal(A.rotate90(A.rotate90(x, ones), ones), A.rotate90(x, 2 * ones))


# ------------------------------------------------------------------------------------------------------------ views


def test_views_order_and_kinds() -> None:
    x = _images(8)
    plain, weak, strong = P.views(x, ["plain", "weak", "strong"], _gen(8), padding=4, flip=True)
    assert plain is x
    gen = _gen(8)
    assert torch.equal(weak, A.random_crop_flip(x, gen, padding=4, flip=True))
    assert torch.equal(strong, R.rand_augment(A.random_crop_flip(x, gen, padding=4, flip=True), gen))
    with pytest.raises(ValueError):
        P.views(x, ["weak", "medium"], _gen(), padding=4, flip=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_batch_matches_cpu_batch() -> None:
    x = _images(64)
    for fn in (A.random_crop_flip, R.rand_augment):
        cpu = fn(x, _gen(9))
        gpu = fn(x.cuda(), _gen(9))
        assert gpu.device.type == "cuda"
        assert (gpu.cpu() != cpu).float().mean().item() < 1e-3, fn.__name__
