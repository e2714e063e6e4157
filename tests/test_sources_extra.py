"""SVHN, Places365 and Tiny-ImageNet (Hugging Face parquet) on fabricated files in the exact official formats.

No real data and no network: the files are written here (``scipy.io.savemat``, PIL JPEGs with the official list
files, ``datasets.Dataset.to_parquet``) and read back through the sources' real loading code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.utils import calculate_md5

from osslbench.errors import ConfigError, DataCorruptError, DataMissingError
from osslbench.sources import cache_clear, get_source, load_split, resize_images, source_names
from osslbench.sources import svhn as svhn_mod


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_clear()
    monkeypatch.setenv("OSSLBENCH_CACHE", str(tmp_path / "cache"))


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_sources_registered() -> None:
    names = source_names()
    for name in ("svhn", "places365", "tinyimagenet-hf"):
        assert name in names
    assert get_source("svhn").native_size == 32
    assert get_source("places365").native_size == 256
    assert get_source("tinyimagenet-hf").native_size == 64


# --------------------------------------------------------------------------------------------------------
# SVHN: MATLAB files with X (32 x 32 x 3 x N uint8) and y (N x 1, 1..10, 10 = digit 0).


def _write_svhn(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
    y[0, 0] = 10  # the digit 0
    y[1, 0] = 3
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"X": x, "y": y})
    return x, y


@pytest.fixture
def svhn_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any]]:
    """A data root with fabricated svhn/{train,test}_32x32.mat; their MD5s injected into SVHN_MD5."""
    root = tmp_path / "data"
    arrays = {}
    for split, n, seed in (("train", 7, 1), ("test", 5, 2)):
        path = root / "svhn" / f"{split}_32x32.mat"
        arrays[split] = _write_svhn(path, n, seed)
        monkeypatch.setitem(svhn_mod.SVHN_MD5, path.name, calculate_md5(str(path)))
    return root, arrays


def test_svhn_loads_official_format(svhn_root: tuple[Path, dict[str, Any]]) -> None:
    root, arrays = svhn_root
    for split in ("train", "test"):
        x, y = arrays[split]
        ds = load_split(f"svhn:{split}", root)
        assert ds.name == f"svhn:{split}"
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (x.shape[3], 3, 32, 32)
        assert torch.equal(ds.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
        assert ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == [int(v) % 10 for v in y[:, 0]]
        assert ds.classes == tuple(str(d) for d in range(10))
    assert load_split("svhn:train", root).labels[:2].tolist() == [0, 3]  # 10 -> digit 0


def test_svhn_truncated_file_is_corrupt(svhn_root: tuple[Path, dict[str, Any]]) -> None:
    root, _ = svhn_root
    path = root / "svhn" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataCorruptError) as exc:
        load_split("svhn:train", root)
    msg = _one_line(exc)
    assert str(path) in msg and "corrupt" in msg
    assert load_split("svhn:test", root).images.shape[0] == 5  # the other split is unaffected


def test_svhn_missing_file(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataMissingError) as exc:
        load_split("svhn:test", root)
    msg = _one_line(exc)
    assert str(root / "svhn" / "test_32x32.mat") in msg
    assert "http://ufldl.stanford.edu/housenumbers/test_32x32.mat" in msg and "--download" in msg
    with pytest.raises(DataMissingError) as exc2:
        get_source("svhn").fingerprint("test", root)
    assert str(exc2.value) == msg


def test_svhn_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train, test, extra"):
        load_split("svhn:valid", tmp_path)
    with pytest.raises(ConfigError):
        get_source("svhn").load("valid", tmp_path, False)


def test_svhn_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``download`` fetches through torchvision's download_url (stubbed here); a failure is one line."""
    import torchvision.datasets.utils as tv_utils

    source_file = tmp_path / "fabricated.mat"
    x, _ = _write_svhn(source_file, 4, 3)
    monkeypatch.setitem(svhn_mod.SVHN_MD5, "test_32x32.mat", calculate_md5(str(source_file)))
    calls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, root, filename, md5))
        shutil.copy(source_file, Path(root) / filename)

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    root = tmp_path / "data"
    (root / "svhn").mkdir(parents=True)
    ds = get_source("svhn").load("test", root, download=True)
    assert torch.equal(ds.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert calls == [("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", str(root / "svhn"), "test_32x32.mat",
                      "eb5a983be6a315427106f1b164d9cef3")]

    def failing_download(*args: Any, **kwargs: Any) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_url", failing_download)
    with pytest.raises(DataMissingError) as exc:
        get_source("svhn").load("train", root, download=True)
    assert "network unreachable" in _one_line(exc) and "train_32x32.mat" in str(exc.value)


def test_svhn_fingerprint(svhn_root: tuple[Path, dict[str, Any]]) -> None:
    root, _ = svhn_root
    src = get_source("svhn")
    first = src.fingerprint("train", root)
    assert first == src.fingerprint("train", root)
    assert first != src.fingerprint("test", root)
    path = root / "svhn" / "train_32x32.mat"
    _bump_mtime(path)
    touched = src.fingerprint("train", root)
    assert touched != first
    _write_svhn(path, 9, 5)
    assert src.fingerprint("train", root) not in (first, touched)


# --------------------------------------------------------------------------------------------------------
# Places365 (small): categories and list files of the devkit, 256x256 JPEGs under data_256_standard / val_256.

# Written to the categories file out of label order: the label index, not the line, decides.
PLACES_CATEGORIES = {"/a/airfield": 0, "/a/apartment_building/outdoor": 1, "/b/beach": 2}
PLACES_TRAIN = [("/b/beach/00000002.jpg", 2), ("/a/airfield/00000001.jpg", 0),
                ("/a/apartment_building/outdoor/00000001.jpg", 1), ("/b/beach/00000001.jpg", 2)]
PLACES_VAL = [("Places365_val_00000003.jpg", 1), ("Places365_val_00000001.jpg", 2), ("Places365_val_00000002.jpg", 0)]


def _jpeg(path: Path, seed: int, size: int = 256, grey: bool = False) -> None:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    base = (ramp[None, :, None] * rng.uniform(0.2, 1.0, 3) + ramp[:, None, None] * rng.uniform(0, 0.5, 3)) / 1.5
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    if grey:
        img = img.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


def _pil_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())


@pytest.fixture
def places_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    folder = root / "places365"
    folder.mkdir(parents=True)
    lines = [f"{name} {idx}" for name, idx in sorted(PLACES_CATEGORIES.items(), key=lambda kv: -kv[1])]
    (folder / "categories_places365.txt").write_text("\n".join(lines) + "\n")
    (folder / "places365_train_standard.txt").write_text("".join(f"{p} {y}\n" for p, y in PLACES_TRAIN))
    (folder / "places365_val.txt").write_text("".join(f"{p} {y}\n" for p, y in PLACES_VAL))
    for i, (p, _) in enumerate(PLACES_TRAIN):
        _jpeg(folder / "data_256_standard" / p.lstrip("/"), seed=i)
    for i, (p, _) in enumerate(PLACES_VAL):
        _jpeg(folder / "val_256" / p, seed=10 + i, grey=(i == 1))
    _jpeg(folder / "val_256" / "not_listed.jpg", seed=99, size=8)  # ignored: the list defines the split
    return root


def test_places365_loads_in_list_order(places_root: Path) -> None:
    classes = ("/a/airfield", "/a/apartment_building/outdoor", "/b/beach")
    folder = places_root / "places365"
    for split, listing, subdir in (("train", PLACES_TRAIN, "data_256_standard"), ("val", PLACES_VAL, "val_256")):
        ds = load_split(f"places365:{split}", places_root)
        assert ds.name == f"places365:{split}" and ds.classes == classes
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(listing), 3, 256, 256)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [y for _, y in listing]
        for i, (p, _) in enumerate(listing):
            assert torch.equal(ds.images[i], _pil_rgb(folder / subdir / p.lstrip("/")))
    grey = load_split("places365:val", places_root).images[1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_places365_resized_through_load_split(places_root: Path) -> None:
    native = load_split("places365:val", places_root)
    small = load_split("places365:val", places_root, image_size=32)
    assert small.images.shape == (3, 3, 32, 32) and small.images.dtype == torch.uint8
    assert torch.equal(small.images, resize_images(native.images, 32))
    assert torch.equal(small.labels, native.labels) and small.classes == native.classes


def test_places365_missing_listed_image(places_root: Path) -> None:
    gone = places_root / "places365" / "val_256" / "Places365_val_00000002.jpg"
    gone.unlink()
    with pytest.raises(DataMissingError) as exc:
        load_split("places365:val", places_root)
    msg = _one_line(exc)
    assert str(gone) in msg and "http://data.csail.mit.edu/places/places365/" in msg and "val_256.tar" in msg
    with pytest.raises(DataMissingError) as exc2:
        get_source("places365").fingerprint("val", places_root)
    assert str(exc2.value) == msg
    assert load_split("places365:train", places_root).images.shape[0] == 4


def test_places365_missing_files(tmp_path: Path, places_root: Path) -> None:
    with pytest.raises(DataMissingError) as exc:
        load_split("places365:train", tmp_path / "nothing")
    msg = _one_line(exc)
    assert str(tmp_path / "nothing" / "places365" / "categories_places365.txt") in msg
    assert "filelist_places365-standard.tar" in msg and "train_256_places365standard.tar" in msg
    (places_root / "places365" / "places365_val.txt").unlink()
    with pytest.raises(DataMissingError, match="places365_val.txt"):
        load_split("places365:val", places_root)


def test_places365_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def failing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "Places365", failing)
    with pytest.raises(DataMissingError) as exc:
        get_source("places365").load("val", tmp_path, download=True)
    assert "no route to host" in _one_line(exc)


def test_places365_corrupt_files(places_root: Path) -> None:
    folder = places_root / "places365"
    _jpeg(folder / "val_256" / "Places365_val_00000001.jpg", seed=1, size=128)
    with pytest.raises(DataCorruptError) as exc:
        load_split("places365:val", places_root)
    assert "Places365_val_00000001.jpg" in _one_line(exc) and "128x128" in str(exc.value)
    (folder / "places365_train_standard.txt").write_text("/a/airfield/00000001.jpg 7\n")
    with pytest.raises(DataCorruptError, match="line 1"):
        load_split("places365:train", places_root)
    (folder / "categories_places365.txt").write_text("/a/airfield 0\n/b/beach 0\n")
    with pytest.raises(DataCorruptError, match="categories_places365.txt line 2"):
        load_split("places365:train", places_root)


def test_places365_fingerprint(places_root: Path) -> None:
    src = get_source("places365")
    first = src.fingerprint("val", places_root)
    assert first == src.fingerprint("val", places_root)
    assert first != src.fingerprint("train", places_root)
    _bump_mtime(places_root / "places365" / "val_256" / "not_listed.jpg")
    assert src.fingerprint("val", places_root) == first  # unlisted files do not count
    _bump_mtime(places_root / "places365" / "val_256" / "Places365_val_00000003.jpg")
    touched = src.fingerprint("val", places_root)
    assert touched != first
    listing = places_root / "places365" / "places365_val.txt"
    listing.write_text("".join(f"{p} {y}\n" for p, y in PLACES_VAL[:2]))
    assert src.fingerprint("val", places_root) not in (first, touched)


# --------------------------------------------------------------------------------------------------------
# Tiny-ImageNet via Hugging Face: parquet files in the hub repository layout, written by ``datasets``.

WNIDS = ["n02124075", "n01443537", "n09256479"]  # deliberately not sorted: the ClassLabel order is the label order


def _hf_rows(n: int, seed: int, grey_at: int | None = None) -> tuple[list[Image.Image], list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    images = [Image.fromarray(a) for a in arrays]
    if grey_at is not None:
        images[grey_at] = images[grey_at].convert("L")
        g = np.asarray(images[grey_at])
        arrays[grey_at] = np.stack([g, g, g], axis=-1)
    labels = [int(v) for v in rng.integers(0, len(WNIDS), size=n)]
    return images, labels, arrays


def _hf_dataset(images: list[Image.Image], labels: list[int]) -> Any:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=WNIDS)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture
def hf_root(tmp_path: Path) -> tuple[Path, dict[str, tuple[list[int], np.ndarray]]]:
    pytest.importorskip("datasets")
    root = tmp_path / "data"
    data = root / "tiny-imagenet-hf" / "data"
    data.mkdir(parents=True)
    expected = {}
    for split, hub, n, seed, grey in (("train", "train", 6, 1, 2), ("val", "valid", 4, 2, None)):
        images, labels, arrays = _hf_rows(n, seed, grey)
        _hf_dataset(images, labels).to_parquet(str(data / f"{hub}-00000-of-00001-0123abcd.parquet"))
        expected[split] = (labels, arrays)
    return root, expected


def test_tinyimagenet_hf_loads_parquet(hf_root: tuple[Path, dict[str, tuple[list[int], np.ndarray]]]) -> None:
    root, expected = hf_root
    for split in ("train", "val"):
        labels, arrays = expected[split]
        ds = load_split(f"tinyimagenet-hf:{split}", root)
        assert ds.name == f"tinyimagenet-hf:{split}" and ds.classes == tuple(WNIDS)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 3, 64, 64)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels
        assert torch.equal(ds.images, torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy()))
    grey = load_split("tinyimagenet-hf:train", root).images[2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_tinyimagenet_hf_missing(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    with pytest.raises(DataMissingError) as exc:
        load_split("tinyimagenet-hf:val", root)
    msg = _one_line(exc)
    assert str(root / "tiny-imagenet-hf" / "data" / "valid-*.parquet") in msg
    assert f"{root}/tiny-imagenet-hf/data/{{train,valid}}-*.parquet" in msg
    assert "rerun with --download (needs internet) or huggingface-cli download zh-plus/tiny-imagenet " \
           f"--repo-type dataset --local-dir {root / 'tiny-imagenet-hf'}" in msg
    with pytest.raises(DataMissingError) as exc2:
        get_source("tinyimagenet-hf").fingerprint("val", root)
    assert str(exc2.value) == msg


def test_tinyimagenet_hf_classes_from_wnids_txt(tmp_path: Path) -> None:
    """Parquet without the huggingface metadata: classes come from wnids.txt, and without it it is an error."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    root = tmp_path / "data"
    folder = root / "tiny-imagenet-hf"
    (folder / "data").mkdir(parents=True)
    images, labels, arrays = _hf_rows(3, 7)
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": blobs, "label": pa.array(labels, type=pa.int64())})
    path = folder / "data" / "valid-00000-of-00001.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataCorruptError) as exc:
        load_split("tinyimagenet-hf:val", root)
    assert str(path) in _one_line(exc) and "wnids.txt" in str(exc.value)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    ds = load_split("tinyimagenet-hf:val", root)
    assert ds.classes == tuple(WNIDS) and ds.labels.tolist() == labels
    assert torch.equal(ds.images, torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy()))


def test_tinyimagenet_hf_damaged_parquet(hf_root: tuple[Path, dict[str, tuple[list[int], np.ndarray]]]) -> None:
    root, _ = hf_root
    path = next((root / "tiny-imagenet-hf" / "data").glob("valid-*.parquet"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataCorruptError) as exc:
        load_split("tinyimagenet-hf:val", root)
    assert str(path) in _one_line(exc)


def test_tinyimagenet_hf_download_writes_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``download`` goes through datasets.load_dataset (stubbed) and stores parquet that later runs read offline."""
    datasets = pytest.importorskip("datasets")
    images, labels, arrays = _hf_rows(3, 11, grey_at=0)
    calls = []

    def fake_load_dataset(name: str, split: str) -> Any:
        calls.append((name, split))
        return _hf_dataset(images, labels)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    root = tmp_path / "data"
    ds = get_source("tinyimagenet-hf").load("val", root, download=True)
    assert calls == [("zh-plus/tiny-imagenet", "valid")]
    assert (root / "tiny-imagenet-hf" / "data" / "valid-00000-of-00001.parquet").is_file()
    assert ds.classes == tuple(WNIDS) and ds.labels.tolist() == labels
    assert torch.equal(ds.images, torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy()))
    again = get_source("tinyimagenet-hf").load("val", root, download=False)
    assert torch.equal(again.images, ds.images) and len(calls) == 1

    def failing(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataMissingError) as exc:
        get_source("tinyimagenet-hf").load("train", root, download=True)
    assert "offline" in _one_line(exc)
    assert not list((root / "tiny-imagenet-hf" / "data").glob("*train*"))  # no partial file left behind


def test_tinyimagenet_hf_fingerprint(hf_root: tuple[Path, dict[str, tuple[list[int], np.ndarray]]]) -> None:
    root, _ = hf_root
    src = get_source("tinyimagenet-hf")
    first = src.fingerprint("train", root)
    assert first == src.fingerprint("train", root)
    assert first != src.fingerprint("val", root)
    path = next((root / "tiny-imagenet-hf" / "data").glob("train-*.parquet"))
    _bump_mtime(path)
    touched = src.fingerprint("train", root)
    assert touched != first
    (root / "tiny-imagenet-hf" / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    assert src.fingerprint("train", root) not in (first, touched)


def test_disk_cache_round_trip(tmp_path: Path, places_root: Path,
                               svhn_root: tuple[Path, dict[str, Any]]) -> None:
    """The fingerprints key the on-disk decoded cache: a second process-fresh load reads the same pixels back."""
    for spec, root in (("places365:val", places_root), ("svhn:test", svhn_root[0])):
        first = load_split(spec, root, image_size=16)
        cache_clear()
        again = load_split(spec, root, image_size=16)
        assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
        assert again.classes == first.classes
    entries = sorted(p.name for p in (tmp_path / "cache").glob("*/*") if p.is_dir())
    assert len(entries) == 2, entries
