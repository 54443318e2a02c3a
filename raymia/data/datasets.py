"""Dataset registry: bundled ``digits`` (default), Fashion-MNIST (Debian's package, or a local folder), CIFAR-10/100
from a local folder, user ``.npz`` files, plug-ins.

Every loader returns a :class:`Dataset` whose features are float32 arrays. Image datasets are NCHW in [0, 1].
Nothing is downloaded unless the config says ``download: true``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raymia.errors import UserError
from raymia.imports import is_import_path, load_callable


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset held in memory.

    Attributes:
        name: registry name or import path it came from.
        x: features, float32 ``[n, *input_shape]`` (images: ``[n, C, H, W]`` in [0, 1]).
        y: integer labels ``[n]`` in ``0..num_classes-1``.
        num_classes: number of classes.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def fingerprint(self) -> str:
        """SHA-256 of the features, labels and shapes: changes whenever the data does (computed once)."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.x.shape, str(self.x.dtype), self.num_classes)).encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()


def make_dataset(name: str, x: Any, y: Any, *, field: str = "data.dataset", num_classes: int | None = None) -> Dataset:
    """Validate raw arrays into a :class:`Dataset` (float32 features, labels remapped to ``0..C-1``)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise UserError(f"features must have shape [n, ...] with at least 2 dimensions, got {x.shape}", field=field)
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"labels must have shape [n] = [{len(x)}], got {y.shape}", field=field)
    if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
        raise UserError(f"features must be numeric, got dtype {x.dtype}", field=field)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or infinite values; clean or impute them first", field=field)
    if len(x) < 20:
        raise UserError(f"dataset has only {len(x)} samples; an audit needs at least 20", field=field)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.mod(y, 1) == 0):
            raise UserError("labels must be integers (class ids), got non-integer floats", field=field)
    elif not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"labels must be integers (class ids), got dtype {y.dtype}", field=field)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UserError("labels contain a single class; membership inference needs a classifier", field=field)
    meta: dict[str, Any] = {}
    if not np.array_equal(classes, np.arange(len(classes))):
        meta["original_classes"] = classes.tolist()
    n_classes = max(len(classes), num_classes or 0)
    return Dataset(name=name, x=np.ascontiguousarray(x), y=y_idx.astype(np.int64), num_classes=n_classes, meta=meta)


def _load_digits(**_: Any) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # [1797, 1, 8, 8] in [0, 1]
    return make_dataset("digits", x, bunch.target)


def _cifar(name: str, tv_class_name: str, folder: str) -> Callable[..., Dataset]:
    def load(data_root: Path | None = None, download: bool = False, **_: Any) -> Dataset:
        if data_root is None:
            raise UserError(f"{name} needs a local folder; set data.data_root to the folder that holds '{folder}/'",
                            field="data.data_root")
        root = Path(data_root).expanduser().resolve()
        if not download and not (root / folder).is_dir():
            raise UserError(
                f"no {name} files under {root} (expected the extracted '{folder}/' folder); put the dataset "
                "there or set data.download: true to fetch it once",
                field="data.data_root",
            )
        import torchvision

        cls = getattr(torchvision.datasets, tv_class_name)
        parts = []
        for train in (True, False):
            try:
                parts.append(cls(root=str(root), train=train, download=download))
            except RuntimeError as exc:  # torchvision: missing or corrupted files
                raise UserError(f"{name} under {root} is incomplete or corrupted ({exc}); re-extract it or set "
                                "data.download: true", field="data.data_root") from None
        x = np.concatenate([p.data for p in parts])  # [60000, 32, 32, 3] uint8
        y = np.concatenate([np.asarray(p.targets) for p in parts])
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return make_dataset(name, x, y, num_classes=len(parts[0].classes))

    return load


#: Where Debian's ``dataset-fashion-mnist`` package puts the four IDX files (``make install`` installs it).
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
_INSTALL_FASHION = ("install Debian's package (apt-get install dataset-fashion-mnist; `make install` does it as "
                    "root), set data.data_root to a folder holding the four Fashion-MNIST .gz files, or set "
                    "data.download: true to fetch them through torchvision")


def read_idx(path: Path, *, magic: int, count: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """An IDX file (gzipped; as LeCun's MNIST and Zalando's Fashion-MNIST ship) as a uint8 array
    ``[count, *item_shape]``; a :class:`UserError` if it is missing, truncated or not what it should be."""
    import gzip

    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} ({exc}); {_INSTALL_FASHION}", field="data.data_root") from None
    dims = len(item_shape) + 1
    header = 4 + 4 * dims
    if len(data) < header:
        raise UserError(f"{path} is truncated (no IDX header); {_INSTALL_FASHION}", field="data.data_root")
    found_magic = int.from_bytes(data[:4], "big")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if found_magic != magic or shape != (count, *item_shape) or len(data) != header + int(np.prod(shape)):
        raise UserError(f"{path} is not the expected IDX file (magic {found_magic}, shape {shape}, {len(data)} bytes; "
                        f"expected magic {magic}, shape {(count, *item_shape)}); {_INSTALL_FASHION}",
                        field="data.data_root")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_folder(root: Path) -> Path:
    """The folder holding the four files: ``root`` itself, or torchvision's ``root/FashionMNIST/raw``."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        if all((folder / f).is_file() for name in _FASHION_FILES for f in _FASHION_FILES[name][:2]):
            return folder
    return root


def _load_fashion_mnist(data_root: Path | None = None, download: bool = False, subset: int | None = None,
                        **_: Any) -> Dataset:
    """Zalando's Fashion-MNIST: 70,000 28x28 grayscale images of 10 clothing classes (the 60,000 training images,
    then the 10,000 test images), ``[70000, 1, 28, 28]`` in [0, 1]. ``data.params: {subset: n}`` keeps n of them
    (a fixed seeded draw, in their original order), for quick runs."""
    root = Path(data_root).expanduser().resolve() if data_root is not None else FASHION_MNIST_ROOT
    if download:
        import torchvision

        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(root=str(root), train=train, download=True)
        except (RuntimeError, OSError) as exc:
            raise UserError(f"could not download Fashion-MNIST into {root} ({exc})", field="data.download") from None
    folder = _fashion_folder(root)
    missing = [f for name in _FASHION_FILES for f in _FASHION_FILES[name][:2] if not (folder / f).is_file()]
    if missing:
        raise UserError(f"Fashion-MNIST is not under {root}: missing {missing}; {_INSTALL_FASHION}",
                        field="data.data_root")
    xs, ys = [], []
    for images, labels, count in _FASHION_FILES.values():
        xs.append(read_idx(folder / images, magic=2051, count=count, item_shape=(28, 28)))
        ys.append(read_idx(folder / labels, magic=2049, count=count, item_shape=()))
    x, y = np.concatenate(xs)[:, None], np.concatenate(ys)
    if subset is not None:
        if not isinstance(subset, int) or not 20 <= subset <= len(y):
            raise UserError(f"subset must be an integer from 20 to {len(y)}, got {subset!r}", field="data.params.subset")
        keep = np.sort(np.random.default_rng(0).choice(len(y), subset, replace=False))
        x, y = x[keep], y[keep]
    return make_dataset("fashion_mnist" if subset is None else f"fashion_mnist[{subset}]", x.astype(np.float32) / 255.0,
                        y, num_classes=10)


def _load_npz(path: Path | None = None, **_: Any) -> Dataset:
    if path is None:
        raise UserError("the npz dataset needs a file; set data.path to an .npz holding arrays 'X' and 'y'",
                        field="data.path")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"file not found: {path}", field="data.path")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"X", "y"} - set(archive.files)
            if missing:
                raise UserError(f"{path} lacks array(s) {sorted(missing)} (found {sorted(archive.files)}); "
                                "save features as 'X' and labels as 'y'", field="data.path")
            x, y = archive["X"], archive["y"]
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read {path} as an .npz of numeric arrays ({exc})", field="data.path") from None
    return make_dataset(f"npz:{path.name}", x, y, field="data.path")


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "cifar10": _cifar("cifar10", "CIFAR10", "cifar-10-batches-py"),
    "cifar100": _cifar("cifar100", "CIFAR100", "cifar-100-python"),
    "fashion_mnist": _load_fashion_mnist,
    "npz": _load_npz,
}


def check_dataset_name(name: str) -> str:
    """Raise ``ValueError`` (for pydantic) unless ``name`` is a registry entry or an import path."""
    if name not in DATASETS and not is_import_path(name):
        raise ValueError(f"unknown dataset '{name}'; choose one of {sorted(DATASETS)} or give "
                         "'package.module:function' returning (X, y)")
    return name


def load_dataset(name: str, *, data_root: Path | None = None, download: bool = False, path: Path | None = None,
                 params: dict[str, Any] | None = None) -> Dataset:
    """Load a dataset by registry name, or call a user plug-in ``module:function(**params)``.

    A plug-in returns either a :class:`Dataset` or a tuple ``(X, y)``.
    """
    params = params or {}
    if name in DATASETS:
        return DATASETS[name](data_root=data_root, download=download, path=path, **params)
    fn = load_callable(name, field="data.dataset")
    try:
        out = fn(**params)
    except UserError:
        raise
    except TypeError as exc:
        raise UserError(f"plug-in '{name}' rejected data.params {params} ({exc})", field="data.params") from None
    if isinstance(out, Dataset):
        return out
    if isinstance(out, tuple) and len(out) == 2:
        return make_dataset(name, out[0], out[1])
    raise UserError(f"plug-in '{name}' must return a raymia Dataset or a tuple (X, y), got {type(out).__name__}",
                    field="data.dataset")
