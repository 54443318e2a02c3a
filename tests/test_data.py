"""Datasets and split plans: loaders validate input, splits are disjoint, reproducible and hashed."""

import numpy as np
import pytest

from raymia.data.datasets import load_dataset, make_dataset
from raymia.data.splits import ROLES, SplitPlan, make_split_plan, reference_keep_mask
from raymia.errors import UserError

FRACTIONS = {"target_members": 0.25, "target_nonmembers": 0.25, "population": 0.35, "calibration": 0.05,
             "test": 0.10}


def test_digits_is_bundled_images_in_unit_range(digits):
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.float32
    assert 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert digits.num_classes == 10 and set(np.unique(digits.y)) == set(range(10))


def test_npz_loader_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "purchase.npz"
    np.savez(good, X=rng.integers(0, 2, (200, 600)), y=rng.integers(1, 101, 200))
    ds = load_dataset("npz", path=good)
    assert ds.x.shape == (200, 600) and ds.y.min() == 0 and ds.y.max() < ds.num_classes
    assert "original_classes" in ds.meta  # labels 1..100 were remapped to 0..C-1

    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, X=np.zeros((50, 3)))
    with pytest.raises(UserError, match=r"data.path: .* lacks array\(s\) \['y'\]"):
        load_dataset("npz", path=no_y)
    with pytest.raises(UserError, match="data.path: file not found"):
        load_dataset("npz", path=tmp_path / "missing.npz")
    with pytest.raises(UserError, match="data.path"):
        load_dataset("npz")
    nan = tmp_path / "nan.npz"
    np.savez(nan, X=np.full((50, 3), np.nan), y=np.arange(50) % 2)
    with pytest.raises(UserError, match="NaN"):
        load_dataset("npz", path=nan)


def test_cifar_without_files_names_data_root(tmp_path):
    with pytest.raises(UserError, match=r"data.data_root: no cifar10 files under .*download: true"):
        load_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(UserError, match="data.data_root"):
        load_dataset("cifar100")


def test_plugin_dataset_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "import numpy as np\n"
        "def blobs(n=100):\n"
        "    rng = np.random.default_rng(0)\n"
        "    return rng.normal(size=(n, 5)), np.arange(n) % 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset("my_data:blobs", params={"n": 120})
    assert ds.x.shape == (120, 5) and ds.num_classes == 3
    with pytest.raises(UserError, match="no attribute 'nope'"):
        load_dataset("my_data:nope")
    with pytest.raises(UserError, match="cannot import module"):
        load_dataset("not_a_module_xyz:f")


def test_split_plan_is_disjoint_reproducible_and_hashed(digits, tmp_path):
    fp = digits.fingerprint()
    a = make_split_plan(len(digits), FRACTIONS, seed=1, data_fingerprint=fp)
    b = make_split_plan(len(digits), FRACTIONS, seed=1, data_fingerprint=fp)
    c = make_split_plan(len(digits), FRACTIONS, seed=2, data_fingerprint=fp)
    union = np.concatenate([a[r] for r in ROLES])
    assert len(np.unique(union)) == len(union)
    assert all(np.array_equal(a[r], b[r]) for r in ROLES) and a.content_hash() == b.content_hash()
    assert c.content_hash() != a.content_hash()

    changed = make_dataset("digits", digits.x.copy(), digits.y)
    changed.x[0, 0, 0, 0] += 0.5
    d = make_split_plan(len(digits), FRACTIONS, seed=1, data_fingerprint=changed.fingerprint())
    assert all(np.array_equal(a[r], d[r]) for r in ROLES) and d.content_hash() != a.content_hash()

    path = a.to_parquet(tmp_path / "split.parquet")
    back = SplitPlan.from_parquet(path)
    assert back.content_hash() == a.content_hash()


def test_overlapping_roles_are_rejected():
    idx = {r: np.arange(i * 10, i * 10 + 10) for i, r in enumerate(ROLES)}
    idx["test"] = np.array([0, 100])
    with pytest.raises(AssertionError, match="overlap"):
        SplitPlan(idx, 0, "fp")


def test_reference_keep_mask_pairs_balance_every_sample():
    keep = reference_keep_mask(101, 8, fraction=0.5, seed=3)
    assert keep.shape == (8, 101) and (keep.sum(axis=0) == 4).all()  # every sample IN for exactly half
    assert set(keep.sum(axis=1)) == {50, 51}
    assert np.array_equal(keep, reference_keep_mask(101, 8, fraction=0.5, seed=3))
    assert not np.array_equal(keep, reference_keep_mask(101, 8, fraction=0.5, seed=4))


def test_reference_keep_mask_other_fractions_have_exact_sizes():
    keep = reference_keep_mask(100, 5, fraction=0.3, seed=0)
    assert (keep.sum(axis=1) == 30).all()


def test_fashion_mnist_loads_offline_from_the_debian_package():
    ds = load_dataset("fashion_mnist")
    assert ds.x.shape == (70000, 1, 28, 28) and ds.num_classes == 10 and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and np.bincount(ds.y).tolist() == [7000] * 10
    small = load_dataset("fashion_mnist", params={"subset": 500})
    assert len(small) == 500 and small.name == "fashion_mnist[500]"
    np.testing.assert_array_equal(small.x, load_dataset("fashion_mnist", params={"subset": 500}).x)


def test_fashion_mnist_reads_torchvisions_layout_and_rejects_missing_or_corrupt_files(tmp_path):
    import shutil

    from raymia.data.datasets import FASHION_MNIST_ROOT

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_MNIST_ROOT.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    assert len(load_dataset("fashion_mnist", data_root=tmp_path)) == 70000  # torchvision's root/FashionMNIST/raw
    with pytest.raises(UserError, match="data.data_root: Fashion-MNIST is not under .*apt-get install"):
        load_dataset("fashion_mnist", data_root=tmp_path / "empty")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="data.data_root: cannot read .*t10k-labels"):
        load_dataset("fashion_mnist", data_root=tmp_path)
    import gzip

    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + (10000).to_bytes(4, "big") + bytes(100))  # truncated body
    with pytest.raises(UserError, match="not the expected IDX file"):
        load_dataset("fashion_mnist", data_root=tmp_path)
    with pytest.raises(UserError, match="data.params.subset"):
        load_dataset("fashion_mnist", params={"subset": 5})
