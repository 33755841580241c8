"""preprocessing.py: ADM crop parity, published images.h5 layout, bad inputs skipped or converted, safe output."""
import io
import json
import os
import stat
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from PIL import Image

import preprocessing
from helpers import PHOTOS, assert_user_error, make_photo_tree, run_script
from preprocessing import center_crop_arr
from utils.errors import UserError
from utils.files import current_umask


def png16_rgb(arr):
    """Bytes of a 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    header = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def make_messy_tree(root):
    """Photos plus every kind of awkward file; returns (expected RGB arrays in file order with labels, bad files)."""
    root = Path(root)
    for folder in ("n01", "n02", "n03"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    astronaut, coffee, camera = skimage.data.astronaut(), skimage.data.coffee(), skimage.data.camera()
    Image.fromarray(astronaut).save(root / "n01/astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(root / "n01/chelsea.JPEG", quality=95)
    Image.fromarray(coffee).convert("CMYK").save(root / "n01/cmyk.jpg", quality=95)
    jpeg = (root / "n01/chelsea.JPEG").read_bytes()
    (root / "n01/truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 2])
    Image.fromarray(coffee).save(root / "n02/coffee.png")
    Image.fromarray(camera).save(root / "n02/gray.png")
    palette = Image.fromarray(astronaut).quantize(64)
    palette.save(root / "n02/palette.png", transparency=0)
    Image.fromarray(skimage.data.logo()).save(root / "n02/rgba.png")
    gray16 = (camera.astype(np.uint16) * 257 + rng.integers(0, 257, camera.shape)).astype(np.uint16)
    Image.fromarray(gray16).save(root / "n02/gray16.png")
    (root / "n02/not_image.JPEG").write_text("this is not a JPEG")
    (root / "n02/empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(root / "n02/tiny.png")
    Image.fromarray(rng.integers(0, 256, (2, 100, 3), dtype=np.uint8)).save(root / "n02/strip.png")
    (root / "n02/notes.txt").write_text("ignored: not an image extension")
    Image.fromarray(skimage.data.rocket()).save(root / "n03/rocket.png")
    rgb16 = rng.integers(0, 65536, (300, 280, 3)).astype(np.uint16)
    (root / "n03/rgb16.png").write_bytes(png16_rgb(rgb16))

    def rgb(name):
        return np.asarray(Image.open(root / name).convert("RGB"))
    expected = [
        (astronaut, 0), (rgb("n01/chelsea.JPEG"), 0), (rgb("n01/cmyk.jpg"), 0),
        (coffee, 1), (np.stack([camera] * 3, -1), 1), (np.stack([(gray16 >> 8).astype(np.uint8)] * 3, -1), 1),
        (rgb("n02/palette.png"), 1), (skimage.data.logo()[..., :3], 1), (rgb("n02/tiny.png"), 1),
        ((rgb16 >> 8).astype(np.uint8), 2), (skimage.data.rocket(), 2),
    ]
    bad = ["n01/truncated.JPEG", "n02/empty.png", "n02/not_image.JPEG", "n02/strip.png"]
    return expected, bad


def read_png(h5f, name):
    """Decode an images.h5 entry to HWC uint8."""
    return np.asarray(Image.open(io.BytesIO(h5f[name][()])))


def test_center_crop_matches_published_fixture(preprocess_fix):
    """ADM crop of the four scikit-image photos equals the published crops bit for bit."""
    fixture = preprocess_fix["center_crop_256"]
    for name in PHOTOS:
        out = center_crop_arr(getattr(skimage.data, name)(), 256)
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, fixture[name].numpy(), err_msg=name)


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """One preprocessing run over the messy tree at 256 px with 2 workers."""
    tmp = tmp_path_factory.mktemp("messy")
    expected, bad = make_messy_tree(tmp / "src")
    labels, stats, skipped = preprocessing.main(
        ["--imagenet-path", str(tmp / "src"), "--output-path", str(tmp / "out"), "--num-workers", "2"])
    return tmp, expected, bad, labels, stats, skipped


def test_published_layout_labels_and_crops(messy_run):
    """images.h5 holds one uncompressed PNG byte string per readable image, in sorted file order, with labels."""
    tmp, expected, _, labels, _, _ = messy_run
    names = [f"00000/img{i:08d}.png" for i in range(len(expected))]
    assert json.loads((tmp / "out/images_h5.json").read_text()) == ["00000", *names, "dataset.json"]
    assert sorted(os.listdir(tmp / "out")) == ["images.h5", "images_h5.json"]
    with h5py.File(tmp / "out/images.h5", "r") as h5f:
        stored = json.loads(h5f["dataset.json"][()].decode("utf-8"))
        assert stored == {"labels": [[n, label] for n, (_, label) in zip(names, expected)]}
        assert labels == stored["labels"]
        for name, (source, _) in zip(names, expected):
            entry = h5f[name]
            assert entry.shape == () and entry.dtype.kind == "S"
            assert entry.nbytes > 256 * 256 * 3  # compress_level=0: raw pixel size plus PNG overhead
            np.testing.assert_array_equal(read_png(h5f, name), center_crop_arr(source, 256), err_msg=name)


def test_fixture_photos_survive_the_whole_pipeline(messy_run, preprocess_fix):
    """Lossless sources come out of images.h5 equal to the published crops."""
    tmp = messy_run[0]
    fixture = preprocess_fix["center_crop_256"]
    with h5py.File(tmp / "out/images.h5", "r") as h5f:
        np.testing.assert_array_equal(read_png(h5f, "00000/img00000000.png"), fixture["astronaut"].numpy())
        np.testing.assert_array_equal(read_png(h5f, "00000/img00000003.png"), fixture["coffee"].numpy())
        np.testing.assert_array_equal(read_png(h5f, "00000/img00000010.png"), fixture["rocket"].numpy())


def test_bad_files_skipped_and_counted(messy_run, capfd):
    """Unreadable files are skipped with a reason; odd modes are converted and counted."""
    tmp, _, bad, labels, stats, skipped = messy_run
    assert sorted(os.path.relpath(path, tmp / "src") for path, _ in skipped) == bad
    reasons = dict((os.path.relpath(path, tmp / "src"), reason) for path, reason in skipped)
    assert "aspect ratio" in reasons["n02/strip.png"]
    assert "UnidentifiedImageError" in reasons["n02/not_image.JPEG"]
    assert "OSError" in reasons["n01/truncated.JPEG"]
    assert len(labels) == 11
    assert stats == {
        "converted from CMYK": 1, "converted from L": 1, "converted from P": 1, "converted from RGBA": 1,
        "converted from I;16": 1, "upsampled (smaller than the crop)": 1}


def test_unreadable_paths_give_a_reason(tmp_path):
    """Missing files and folders named like images come back as skips, never exceptions."""
    status, reason = preprocessing.process_image((str(tmp_path / "gone.JPEG"), 32))
    assert status == "skip" and reason.startswith("FileNotFoundError")
    (tmp_path / "folder.png").mkdir()
    status, reason = preprocessing.process_image((str(tmp_path / "folder.png"), 32))
    assert status == "skip" and reason.startswith("IsADirectoryError")


def test_refuses_to_overwrite_without_flag(tmp_path):
    """An existing output is kept and named in the error; --overwrite replaces it."""
    make_photo_tree(tmp_path / "src", photos=("chelsea",), classes=("a",))
    argv = ["--imagenet-path", str(tmp_path / "src"), "--output-path", str(tmp_path / "out"),
            "--num-workers", "1", "--resolution", "32"]
    preprocessing.main(argv)
    before = (tmp_path / "out/images.h5").read_bytes()
    with pytest.raises(UserError, match=r"images\.h5 already exists; pass --overwrite"):
        preprocessing.main(argv[:-1] + ["64"])
    assert (tmp_path / "out/images.h5").read_bytes() == before
    preprocessing.main(argv[:-1] + ["64", "--overwrite"])
    with h5py.File(tmp_path / "out/images.h5", "r") as h5f:
        assert read_png(h5f, "00000/img00000000.png").shape == (64, 64, 3)


def test_no_partial_output_after_failure(tmp_path, monkeypatch):
    """A run that dies mid-way leaves neither output nor temporary files."""
    make_photo_tree(tmp_path / "src")
    real_write, calls = preprocessing.write_dataset, []

    def failing_write(h5f, name, data):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(h5f, name, data)

    monkeypatch.setattr(preprocessing, "write_dataset", failing_write)
    with pytest.raises(OSError, match="disk full"):
        preprocessing.main(["--imagenet-path", str(tmp_path / "src"), "--output-path", str(tmp_path / "out"),
                            "--num-workers", "1", "--resolution", "32"])
    assert os.listdir(tmp_path / "out") == []


def test_labels_from_source_dataset_json(tmp_path):
    """A dataset.json in the source gives the classes; files it does not label are skipped."""
    make_photo_tree(tmp_path / "src", photos=("astronaut", "chelsea", "coffee"), classes=("x",))
    labels = {"labels": [["x/astronaut.png", 7], ["x/coffee.png", 3]]}
    (tmp_path / "src/dataset.json").write_text(json.dumps(labels))
    labels, _, skipped = preprocessing.main(["--imagenet-path", str(tmp_path / "src"), "--output-path",
                                             str(tmp_path / "out"), "--num-workers", "1", "--resolution", "32"])
    assert labels == [["00000/img00000000.png", 7], ["00000/img00000001.png", 3]]
    assert [(Path(p).name, reason) for p, reason in skipped] == [("chelsea.png", "no label in the source dataset.json")]


def test_malformed_source_dataset_json_is_named(tmp_path):
    make_photo_tree(tmp_path / "src", photos=("chelsea",), classes=("x",))
    (tmp_path / "src/dataset.json").write_text('{"labels": [["x/chelsea.png"]]}')
    with pytest.raises(UserError, match=r"src/dataset\.json is not a labels file .*fix or remove it"):
        preprocessing.main(["--imagenet-path", str(tmp_path / "src"), "--output-path", str(tmp_path / "out"),
                            "--num-workers", "1", "--resolution", "32"])
    assert not (tmp_path / "out").exists()


def test_max_images_takes_the_first_files(tmp_path):
    """--max-images keeps the first N files of the sorted list."""
    make_photo_tree(tmp_path / "src", classes=("a", "b", "c", "d"))
    labels, _, _ = preprocessing.main(["--imagenet-path", str(tmp_path / "src"), "--output-path", str(tmp_path / "o"),
                                       "--num-workers", "1", "--resolution", "32", "--max-images", "2"])
    assert [label for _, label in labels] == [0, 1]


@pytest.mark.slow
def test_command_line(tmp_path):
    """The script runs from the shell and exits non-zero with a clear message when the output exists."""
    make_photo_tree(tmp_path / "src", photos=("chelsea", "coffee"))
    args = ["--imagenet-path", tmp_path / "src", "--output-path", tmp_path / "out", "--num-workers", 2,
            "--resolution", 32]
    first = run_script("preprocessing.py", *args)
    assert "Wrote 2 images" in first.stdout
    assert stat.S_IMODE((tmp_path / "out" / "images.h5").stat().st_mode) == 0o666 & ~current_umask()
    second = run_script("preprocessing.py", *args, check=False, cwd=tmp_path)  # from any working folder
    assert second.returncode == 1
    assert_user_error(second, f"{tmp_path / 'out' / 'images.h5'} already exists; pass --overwrite")


def test_decoding_windows_keep_file_order(tmp_path):
    """Results come back in task order across several pool windows."""
    tasks = [(str(tmp_path / f"missing{i:02d}.png"), 32) for i in range(40)]
    with preprocessing.multiprocessing.Pool(2) as pool:
        results = list(preprocessing.decode_all(pool, tasks, num_workers=1, chunksize=1))
    assert [f"missing{i:02d}.png" in reason for i, (_, reason) in enumerate(results)] == [True] * 40
