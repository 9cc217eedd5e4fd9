"""Dataset loaders read the real on-disk formats and reject bad input with a one-line DataError.

Every fixture is written in the format the real distribution uses (CIFAR's protocol-2 dict
pickles and tarball, GTSRB's .ppm files and semicolon CSVs, .npz archives, PNG/JPEG/BMP/PPM
class folders), tiny, inside the test session.
"""

from __future__ import annotations

import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits as sklearn_digits

from harness.core.errors import BlindspotsError, DataError
from harness.data import DATASETS, load_dataset
from harness.data.cifar10 import TRAIN_BATCHES

RED, GREEN, BLUE = (220, 10, 30), (15, 200, 40), (5, 25, 240)


def raises_naming(path: Path | str, *extra: str) -> pytest.RaisesExc:
    """Expect a DataError whose message names ``path`` (and each of ``extra``)."""
    pattern = "".join(f"(?=.*{re.escape(str(s))})" for s in (path, *extra))
    return pytest.raises(DataError, match=pattern)


def assert_one_line(exc_info: pytest.ExceptionInfo[BaseException]) -> None:
    assert "\n" not in str(exc_info.value)


# --------------------------------------------------------------------------- registry / options


def test_every_builtin_dataset_name_resolves_to_its_loader() -> None:
    for name in ("digits", "cifar10", "gtsrb", "npz", "folder"):
        assert callable(DATASETS.get(name)), name


def test_unknown_dataset_name_suggests_the_closest() -> None:
    with pytest.raises(BlindspotsError, match="did you mean 'cifar10'"):
        load_dataset("cifar")


@pytest.mark.parametrize("bad", [0, -3, "32", 2.5, True])
def test_bad_image_size_is_a_data_error(bad: object) -> None:
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", image_size=bad)


def test_unknown_option_is_a_data_error_not_silently_ignored() -> None:
    with pytest.raises(DataError, match="imagesize"):
        load_dataset("digits", imagesize=16)


# --------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_deterministic_and_in_pixel_range() -> None:
    data = load_dataset("digits", data_root="/ignored/anyway")
    again = load_dataset("digits")
    assert data.x_train.shape == (1347, 8, 8, 1) and data.x_test.shape == (450, 8, 8, 1)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")
    np.testing.assert_array_equal(data.x_train, again.x_train)
    np.testing.assert_array_equal(data.y_test, again.y_test)
    # Stratified: every class keeps ~25% of its samples in the test split.
    totals = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    np.testing.assert_allclose(np.bincount(data.y_test, minlength=10), totals * 0.25, atol=1)


def test_digits_pixels_are_sklearn_values_scaled_to_0_255() -> None:
    bunch = sklearn_digits()
    expected = {tuple(np.round(img * 255 / 16).astype(int).ravel()) for img in bunch.images}
    data = load_dataset("digits")
    assert data.x_train.max() == 255 and data.x_train.min() == 0
    for image in (*data.x_train[:20], *data.x_test[:20]):
        assert tuple(image.astype(int).ravel()) in expected


def test_digits_image_size_resizes() -> None:
    data = load_dataset("digits", image_size=16)
    assert data.x_train.shape[1:] == (16, 16, 1) and data.x_test.shape[1:] == (16, 16, 1)


# --------------------------------------------------------------------------- cifar10


def planar(images: np.ndarray) -> np.ndarray:
    """NHWC → CIFAR's rows of 1024 R, then 1024 G, then 1024 B values."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.fixture
def cifar_folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A ``cifar-10-batches-py`` folder: 5 train batches of 2 images, a test batch of 3."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x_train = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    x_train[0, 1, 2] = (10, 20, 30)  # a known RGB pixel at row 1, column 2
    y_train = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    for i, name in enumerate(TRAIN_BATCHES):
        rows = slice(2 * i, 2 * i + 2)
        batch = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": y_train[rows].tolist(),
            b"data": planar(x_train[rows]),
            b"filenames": [b"a.png", b"b.png"],
        }
        write_pickle(folder / name, batch)
    x_test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y_test = np.array([2, 0, 1])
    write_pickle(folder / "test_batch", {b"labels": y_test.tolist(), b"data": planar(x_test)})
    write_pickle(folder / "batches.meta", {b"label_names": [b"cat", b"dog", b"ship"]})
    return folder, x_train, y_train, x_test, y_test


def make_tarball(folder: Path, tarball: Path) -> Path:
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    return tarball


@pytest.mark.parametrize("where", ["folder", "parent", "tarball", "dir_with_tarball"])
def test_cifar10_round_trips_pixels_labels_and_names_from_every_location(
    cifar_folder: tuple, tmp_path: Path, where: str
) -> None:
    folder, x_train, y_train, x_test, y_test = cifar_folder
    if where in ("tarball", "dir_with_tarball"):
        archive_dir = tmp_path / "archive"
        archive_dir.mkdir()
        tarball = make_tarball(folder, archive_dir / "cifar-10-python.tar.gz")
        for f in folder.iterdir():  # prove nothing is read from the extracted copy
            f.unlink()
        folder.rmdir()
        root = tarball if where == "tarball" else archive_dir
    else:
        root = folder if where == "folder" else folder.parent

    data = load_dataset("cifar10", str(root))

    assert data.x_train.shape == (10, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert tuple(data.x_train[0, 1, 2]) == (10, 20, 30)
    np.testing.assert_array_equal(data.x_train, x_train)
    np.testing.assert_array_equal(data.x_test, x_test)
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.y_test, y_test)
    assert data.y_train.dtype == np.int64
    assert data.class_names == ("cat", "dog", "ship") and data.num_classes == 3


def test_cifar10_reads_pickles_written_by_numpy_1(cifar_folder: tuple) -> None:
    """Real CIFAR pickles name ``numpy.core.multiarray``; numpy 2 writes ``numpy._core``."""
    folder, x_train, *_ = cifar_folder
    path = folder / "data_batch_1"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data = load_dataset("cifar10", str(folder))
    np.testing.assert_array_equal(data.x_train, x_train)


def test_cifar10_image_size_resizes(cifar_folder: tuple) -> None:
    data = load_dataset("cifar10", str(cifar_folder[0]), image_size=16)
    assert data.x_train.shape == (10, 16, 16, 3) and data.x_test.shape == (3, 16, 16, 3)


class _OpensAFile:
    """Unpickling this would create a file: what a hostile data file could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def test_cifar10_refuses_pickles_that_would_run_code(cifar_folder: tuple, tmp_path: Path) -> None:
    folder = cifar_folder[0]
    marker = tmp_path / "pwned"
    write_pickle(folder / "data_batch_2", {b"data": _OpensAFile(marker), b"labels": [0]})
    with raises_naming(folder / "data_batch_2", "refuses to load"):
        load_dataset("cifar10", str(folder))
    assert not marker.exists()


def test_cifar10_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nope", "cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    with raises_naming(tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz") as info:
        load_dataset("cifar10", str(tmp_path))
    assert_one_line(info)
    with pytest.raises(DataError, match="needs a data root"):
        load_dataset("cifar10")


def test_cifar10_missing_batch_file(cifar_folder: tuple) -> None:
    folder = cifar_folder[0]
    (folder / "data_batch_3").unlink()
    with raises_naming(folder, "data_batch_3"):
        load_dataset("cifar10", str(folder))


def test_cifar10_tarball_missing_a_batch(cifar_folder: tuple, tmp_path: Path) -> None:
    folder = cifar_folder[0]
    (folder / "test_batch").unlink()
    tarball = make_tarball(folder, tmp_path / "cifar-10-python.tar.gz")
    with raises_naming(tarball, "test_batch"):
        load_dataset("cifar10", str(tarball))


def test_cifar10_truncated_tarball(cifar_folder: tuple, tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    tarball = make_tarball(cifar_folder[0], tmp_path / "archive" / "cifar-10-python.tar.gz")
    tarball.write_bytes(tarball.read_bytes()[:5000])
    with raises_naming(tarball) as info:
        load_dataset("cifar10", str(tarball.parent))
    assert_one_line(info)


def test_cifar10_corrupt_pickle(cifar_folder: tuple) -> None:
    folder = cifar_folder[0]
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00garbage")
    with raises_naming(folder / "test_batch", "not a readable CIFAR pickle") as info:
        load_dataset("cifar10", str(folder))
    assert_one_line(info)


@pytest.mark.parametrize(
    ("batch", "complaint"),
    [
        ({b"labels": [0, 1]}, "b'data'"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "(N, 3072)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, "2 integers"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_cifar10_malformed_batches(cifar_folder: tuple, batch: object, complaint: str) -> None:
    folder = cifar_folder[0]
    write_pickle(folder / "data_batch_4", batch)
    with raises_naming(folder / "data_batch_4", complaint):
        load_dataset("cifar10", str(folder))


# --------------------------------------------------------------------------- gtsrb

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def save_ppm(path: Path, image: Image.Image) -> tuple[int, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PPM")
    return image.size


def split_frame(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: the ROI (left half) alone would lose the blue."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def write_gtsrb(data_root: Path, layout: str, test_csv_at: str) -> dict[str, object]:
    """Write a tiny GTSRB copy; return what the loader should produce."""
    if layout == "official":
        gtsrb = data_root / "GTSRB"
        train_dir = gtsrb / "Final_Training" / "Images"
        csv_dirs = {"images": gtsrb / "Final_Test" / "Images", "gtsrb": gtsrb, "root": data_root}
    else:  # torchvision
        gtsrb = data_root / "gtsrb" / "GTSRB"
        train_dir = gtsrb / "Training"
        csv_dirs = {"root": data_root / "gtsrb"}
    # Classes 0 and 2 (no folder for 1): labels must follow folder numbers, not folder order.
    train = {
        0: [(split_frame(40, 36), (0, 0, 20, 36)), (Image.new("RGB", (29, 31), GREEN), None)],
        2: [(Image.new("RGB", (52, 47), BLUE), None)],
    }
    for class_id, frames in train.items():
        rows = []
        for k, (frame, roi) in enumerate(frames):
            name = f"00000_{k:05d}.ppm"
            w, h = save_ppm(train_dir / f"{class_id:05d}" / name, frame)
            x1, y1, x2, y2 = roi or (1, 1, w - 1, h - 1)
            rows.append(f"{name};{w};{h};{x1};{y1};{x2};{y2};{class_id}\n")
        (train_dir / f"{class_id:05d}" / f"GT-{class_id:05d}.csv").write_text(
            GT_HEADER + "".join(rows)
        )
    test_dir = gtsrb / "Final_Test" / "Images"
    test = [("00000.ppm", GREEN, 42), ("00001.ppm", RED, 0), ("00002.ppm", BLUE, 7)]
    rows = []
    for name, color, class_id in test:
        w, h = save_ppm(test_dir / name, Image.new("RGB", (33, 45), color))
        rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{class_id}\n")
    # The official test-images zip ships labels stripped; it must not be mistaken for the GT csv.
    (test_dir / "GT-final_test.test.csv").write_text("Filename;Width;Height\n00000.ppm;33;45\n")
    (csv_dirs[test_csv_at] / "GT-final_test.csv").write_text(GT_HEADER + "".join(rows))
    return {
        "gtsrb_dir": gtsrb,
        "test_dir": test_dir,
        "test_csv": csv_dirs[test_csv_at] / "GT-final_test.csv",
        "y_train": [0, 0, 2],
        "y_test": [42, 0, 7],
        "test_colors": [GREEN, RED, BLUE],
    }


@pytest.mark.parametrize(
    ("layout", "test_csv_at", "point_at_gtsrb_dir"),
    [
        ("official", "images", False),
        ("official", "gtsrb", False),
        ("official", "root", False),
        ("official", "images", True),
        ("torchvision", "root", False),
    ],
)
def test_gtsrb_layouts_load_full_frames_rgb_with_labels(
    tmp_path: Path, layout: str, test_csv_at: str, point_at_gtsrb_dir: bool
) -> None:
    expected = write_gtsrb(tmp_path, layout, test_csv_at)
    root = expected["gtsrb_dir"] if point_at_gtsrb_dir else tmp_path

    data = load_dataset("gtsrb", str(root))

    assert data.x_train.shape == (3, 32, 32, 3) and data.x_test.shape == (3, 32, 32, 3)
    assert data.x_train.dtype == np.uint8
    assert data.y_train.tolist() == expected["y_train"]
    assert data.y_test.tolist() == expected["y_test"]  # CSV order and ClassId
    assert data.num_classes == 43 and len(data.class_names) == 43
    # Full frame, not the ROI crop: the red left edge and the blue right edge both survive.
    split = data.x_train[0]
    assert tuple(split[16, 0]) == RED and tuple(split[16, 31]) == BLUE
    assert (data.x_train[1] == GREEN).all() and (data.x_train[2] == BLUE).all()
    for image, color in zip(data.x_test, expected["test_colors"], strict=True):
        assert (image == color).all()  # uniform frames keep their exact RGB after resizing


def test_gtsrb_image_size_option(tmp_path: Path) -> None:
    write_gtsrb(tmp_path, "official", "images")
    data = load_dataset("gtsrb", str(tmp_path), image_size=24)
    assert data.x_train.shape == (3, 24, 24, 3) and data.x_test.shape == (3, 24, 24, 3)


def test_gtsrb_missing_root_and_missing_training_folder(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nope", "Final_Training"):
        load_dataset("gtsrb", str(tmp_path / "nope"))
    with raises_naming(tmp_path, "Final_Training") as info:
        load_dataset("gtsrb", str(tmp_path))
    assert_one_line(info)


def test_gtsrb_missing_test_images_or_labels(tmp_path: Path) -> None:
    expected = write_gtsrb(tmp_path, "official", "root")
    Path(expected["test_csv"]).unlink()
    with raises_naming(expected["test_dir"], "GT-final_test.csv", "GTSRB_Final_Test_GT.zip"):
        load_dataset("gtsrb", str(tmp_path))
    for f in Path(expected["test_dir"]).iterdir():
        f.unlink()
    Path(expected["test_dir"]).rmdir()
    with raises_naming(expected["gtsrb_dir"], "Final_Test/Images"):
        load_dataset("gtsrb", str(tmp_path))


@pytest.mark.parametrize(
    ("csv_text", "complaint"),
    [
        ("Filename,Width,Height,ClassId\n00000.ppm,33,45,1\n", "Filename and ClassId"),
        (GT_HEADER, "Filename and ClassId"),
        (GT_HEADER + "00000.ppm;33;45;5;5;28;40;seven\n", "line 2: ClassId 'seven'"),
        (GT_HEADER + "00000.ppm;33;45;5;5;28;40;1\nmissing.ppm;1;1;0;0;1;1;1\n", "line 3"),
        (GT_HEADER + "00000.ppm;33;45;5;5;28;40;43\n", "outside 0..42"),
    ],
)
def test_gtsrb_bad_test_csv(tmp_path: Path, csv_text: str, complaint: str) -> None:
    expected = write_gtsrb(tmp_path, "official", "root")
    csv_path = Path(expected["test_csv"])
    csv_path.write_text(csv_text)
    path_in_message = "" if complaint.startswith("outside") else csv_path
    with pytest.raises(DataError, match=re.escape(complaint)) as info:
        load_dataset("gtsrb", str(tmp_path))
    assert str(path_in_message) in str(info.value)
    assert_one_line(info)


def test_gtsrb_corrupt_image(tmp_path: Path) -> None:
    expected = write_gtsrb(tmp_path, "official", "images")
    broken = Path(expected["test_dir"]) / "00001.ppm"
    broken.write_bytes(b"P6\n33 45\n255\n" + b"\x00" * 10)  # truncated pixel data
    with raises_naming(broken, "cannot read image") as info:
        load_dataset("gtsrb", str(tmp_path))
    assert_one_line(info)


# --------------------------------------------------------------------------- npz


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2], dtype=np.int32),
        "x_test": rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8),
        "y_test": np.array([4, 1], dtype=np.uint8),
    }


def test_npz_round_trips_and_counts_classes_across_both_splits(
    tmp_path: Path, npz_arrays: dict[str, np.ndarray]
) -> None:
    path = write_npz(tmp_path / "mine.npz", **npz_arrays)
    for root in (path, tmp_path):  # the file itself, or a folder holding exactly one .npz
        data = load_dataset("npz", str(root))
        for key in ("x_train", "x_test", "y_train", "y_test"):
            np.testing.assert_array_equal(getattr(data, key), npz_arrays[key])
        assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
        assert data.num_classes == 5  # max label 4 sits only in the test split


def test_npz_grayscale_gets_a_channel_axis_and_keras_labels_flatten(tmp_path: Path) -> None:
    x = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    path = write_npz(
        tmp_path / "gray.npz",
        x_train=x,
        y_train=np.array([[0], [1], [1], [0]]),
        x_test=x[:2],
        y_test=np.array([1, 0]),
    )
    data = load_dataset("npz", str(path))
    assert data.x_train.shape == (4, 3, 3, 1) and data.image_shape == (3, 3, 1)
    np.testing.assert_array_equal(data.x_train[..., 0], x)
    assert data.y_train.tolist() == [0, 1, 1, 0] and data.num_classes == 2


def test_npz_class_names_and_resize(tmp_path: Path, npz_arrays: dict[str, np.ndarray]) -> None:
    names = np.array(["a", "b", "c", "d", "e", "f"])
    path = write_npz(tmp_path / "named.npz", class_names=names, **npz_arrays)
    data = load_dataset("npz", str(path), image_size=4)
    assert data.class_names == tuple(names) and data.num_classes == 6
    assert data.x_train.shape == (6, 4, 4, 3)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"y_test": None}, "lacks y_test"),
        ({"x_train": np.zeros((6, 5, 7, 3), np.float32)}, "must be uint8"),
        ({"y_train": np.zeros(5, np.int64)}, "6 integer labels"),
        ({"y_train": np.zeros(6, np.float64)}, "integer labels"),
        ({"x_test": np.zeros((2, 5, 7, 4), np.uint8)}, "1 or 3 channels"),
        ({"y_train": np.array([0, 1, -1, 0, 1, 2])}, "negative label"),
        ({"x_train": np.array([None] * 6, dtype=object)}, "cannot read arrays"),
        ({"class_names": np.array(["a", "b"])}, "class_names lists 2"),
    ],
)
def test_npz_bad_contents(
    tmp_path: Path, npz_arrays: dict[str, np.ndarray], change: dict, complaint: str
) -> None:
    arrays = {k: v for k, v in {**npz_arrays, **change}.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with raises_naming(path, complaint) as info:
        load_dataset("npz", str(path))
    assert_one_line(info)


def test_npz_bad_files_and_folders(tmp_path: Path, npz_arrays: dict[str, np.ndarray]) -> None:
    with raises_naming(tmp_path, "found none"):
        load_dataset("npz", str(tmp_path))
    write_npz(tmp_path / "a.npz", **npz_arrays)
    write_npz(tmp_path / "b.npz", **npz_arrays)
    with raises_naming(tmp_path, "a.npz, b.npz"):
        load_dataset("npz", str(tmp_path))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not really a zip")
    with raises_naming(garbage, "not an .npz (zip) archive"):
        load_dataset("npz", str(garbage))
    corrupt = write_npz(tmp_path / "corrupt.npz", **npz_arrays)
    raw = bytearray(corrupt.read_bytes())
    raw[300:340] = bytes(40)  # inside x_train's pixel data: the member's CRC no longer matches
    corrupt.write_bytes(bytes(raw))
    with raises_naming(corrupt, "cannot read arrays") as info:
        load_dataset("npz", str(corrupt))
    assert_one_line(info)
    single = tmp_path / "single.npy"
    np.save(single, npz_arrays["x_train"])
    with raises_naming(single, "not an .npz (zip) archive"):
        load_dataset("npz", str(single))
    with raises_naming(tmp_path / "missing.npz"):
        load_dataset("npz", str(tmp_path / "missing.npz"))


@pytest.mark.slow
def test_npz_loads_the_shared_gtsrb32_file() -> None:
    path = Path("/work/shared/data/gtsrb32.npz")
    if not path.is_file():
        pytest.skip(f"{path} not present")
    data = load_dataset("npz", str(path))
    assert data.x_train.shape == (39209, 32, 32, 3) and data.x_test.shape == (12630, 32, 32, 3)
    assert data.num_classes == 43
    assert set(np.unique(data.y_train)) == set(range(43))


# --------------------------------------------------------------------------- folder


def write_folder_tree(root: Path) -> None:
    """train/{cat,dog,zebra} and test/{cat,zebra} in several image formats, plus clutter."""
    images = {
        "train/cat/1.png": Image.new("RGB", (40, 30), RED),
        "train/cat/2.PNG": Image.new("L", (20, 20), 77),  # grayscale → RGB
        "train/dog/1.jpg": Image.new("RGB", (32, 32), GREEN),
        "train/zebra/1.bmp": Image.new("RGB", (16, 48), BLUE),
        "train/zebra/2.ppm": Image.new("RGB", (32, 32), GREEN),
        "test/cat/9.png": Image.new("RGBA", (10, 10), (*RED, 255)),
        "test/zebra/9.png": Image.new("RGB", (64, 64), BLUE),
    }
    for rel, image in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/.cache").mkdir()


def test_folder_labels_follow_sorted_class_names_and_pixels_are_rgb(tmp_path: Path) -> None:
    write_folder_tree(tmp_path)
    data = load_dataset("folder", str(tmp_path))
    assert data.class_names == ("cat", "dog", "zebra") and data.num_classes == 3
    assert data.x_train.shape == (5, 32, 32, 3) and data.x_test.shape == (2, 32, 32, 3)
    assert data.y_train.tolist() == [0, 0, 1, 2, 2] and data.y_test.tolist() == [0, 2]
    assert (data.x_train[0] == RED).all()
    assert (data.x_train[1] == 77).all()
    np.testing.assert_allclose(data.x_train[2], np.broadcast_to(GREEN, (32, 32, 3)), atol=3)  # JPEG
    assert (data.x_train[3] == BLUE).all() and (data.x_train[4] == GREEN).all()
    assert (data.x_test[0] == RED).all() and (data.x_test[1] == BLUE).all()


def test_folder_image_size_option(tmp_path: Path) -> None:
    write_folder_tree(tmp_path)
    data = load_dataset("folder", str(tmp_path), image_size=8)
    assert data.x_train.shape == (5, 8, 8, 3)


def test_folder_errors_name_the_offending_path(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "train", "train/<class>/<image>"):
        load_dataset("folder", str(tmp_path))
    write_folder_tree(tmp_path)

    (tmp_path / "test/horse").mkdir()
    Image.new("RGB", (8, 8), RED).save(tmp_path / "test/horse/1.png")
    with raises_naming(tmp_path / "test/horse", "no matching train class"):
        load_dataset("folder", str(tmp_path))
    (tmp_path / "test/horse/1.png").unlink()
    (tmp_path / "test/horse").rmdir()

    (tmp_path / "train/emu").mkdir()
    with raises_naming(tmp_path / "train/emu", "holds no images"):
        load_dataset("folder", str(tmp_path))
    (tmp_path / "train/emu").rmdir()

    broken = tmp_path / "train/dog/2.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with raises_naming(broken, "cannot read image") as info:
        load_dataset("folder", str(tmp_path))
    assert_one_line(info)
