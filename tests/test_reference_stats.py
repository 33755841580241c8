"""reference_stats.py and evaluation/reference.py: the statistics file, its three sources, evaluate.py reading it as it
reads the ADM batch it was made from, and the refusals a trainer relies on. Random Inception weights, a small ViT for
DINOv2."""
import hashlib

import numpy as np
import pytest
from PIL import Image

import evaluate
import reference_stats
from dataset.image_files import center_crop_arr, read_rgb
from evaluation import dinov2
from evaluation.features import FeatureExtractor, choose_metrics, full_rank_warning
from evaluation.flags import METRICS
from evaluation.metrics import fid_statistics
from evaluation.reference import ReferenceStatistics, check_reference
from helpers import make_dataset, use_cheap_frechet
from utils.errors import UserError

STATS_KEYS = {"mu", "sigma", "mu_s", "sigma_s", "mu_dinov2", "sigma_dinov2"}
METADATA_KEYS = {"source", "num_images", "resolution", "inception_weights_sha256", "dinov2_weights_sha256"}


@pytest.fixture(autouse=True)
def small_dinov2(monkeypatch):
    """A ViT-S/14 instead of the ViT-L/14, which is too slow for tests on a CPU."""
    monkeypatch.setattr(dinov2, "DINOV2_ENCODER", "dinov2-vit-s")


def random_images(count, size=32, seed=0):
    """uint8 (count, size, size, 3) images."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def made(reference):
    """The session's ADM-style batch of eight 32-px images and the statistics file reference_stats.py made of it in
    batches of 4 (conftest.reference)."""
    stats, _ = reference
    return {"adm": stats.parent / "adm.npz", "stats": stats}


def flags(inception_weights, *extra):
    """evaluate.py / reference_stats.py flags of these tests: the random Inception file, a random small DINOv2."""
    return ["--inception-weights", str(inception_weights), "--dinov2-random-init", "--batch-size", "3", "--device",
            "cpu", *map(str, extra)]


@pytest.mark.slow
def test_stats_file_holds_the_adm_statistics_and_metadata(made, inception_weights):
    with np.load(made["stats"]) as npz:
        stored = {key: npz[key] for key in npz.files}
    assert set(stored) == STATS_KEYS | METADATA_KEYS
    images = np.load(made["adm"])["arr_0"]
    extractor = FeatureExtractor(["fid", "sfid", "fd_dinov2"], inception_weights=inception_weights,
                                 dinov2_random_init=True)
    parts = [extractor(images[:4]), extractor(images[4:])]  # the script's batches of 4
    for feature, (mu_key, sigma_key) in {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"),
                                         "dinov2": ("mu_dinov2", "sigma_dinov2")}.items():
        values = np.concatenate([part[feature] for part in parts])
        mu, sigma = fid_statistics(values)
        np.testing.assert_array_equal(stored[mu_key], mu)
        np.testing.assert_array_equal(stored[sigma_key], sigma)
        # the ADM meaning: np.mean of the float32 features and np.cov(rowvar=False), float64
        assert stored[mu_key].dtype == np.float32 and stored[sigma_key].dtype == np.float64
        np.testing.assert_allclose(stored[sigma_key], np.cov(values.astype(np.float64), rowvar=False), atol=1e-9)
    assert stored["mu"].shape == (2048,) and stored["sigma_s"].shape == (2023, 2023)
    assert stored["source"].item() == str(made["adm"].resolve())
    assert stored["num_images"].item() == 8 and stored["resolution"].item() == 32
    assert stored["inception_weights_sha256"].item() == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    assert stored["dinov2_weights_sha256"].item() == "random"

    reference = ReferenceStatistics.load(made["stats"])
    assert reference.images is None and reference.resolution == 32 and reference.num_images == 8
    assert reference.weights_sha256 == {"inception": stored["inception_weights_sha256"].item(), "dinov2": "random"}
    assert reference.source == str(made["adm"].resolve()) and set(reference.statistics) == {"pool", "spatial", "dinov2"}


@pytest.mark.slow
def test_evaluate_with_the_stats_file_equals_evaluate_with_the_batch_it_was_made_from(made, inception_weights, tmp_path,
                                                                                        monkeypatch):
    use_cheap_frechet(monkeypatch)
    np.savez(tmp_path / "samples.npz", arr_0=random_images(4, seed=2))
    argv = [str(tmp_path / "samples.npz"), "--metrics", "fid,sfid,fd_dinov2", *flags(inception_weights)]
    from_stats = evaluate.main([str(made["stats"]), *argv])
    from_batch = evaluate.main([str(made["adm"]), *argv])
    for key in ("fid", "sfid", "fd_dinov2"):
        assert from_stats[key] == from_batch[key] and from_stats[key] > 0, key
    assert from_stats["num_ref"] == from_batch["num_ref"] == 8


@pytest.mark.slow
def test_stats_file_without_images_leaves_out_precision_and_recall(made):
    reference = ReferenceStatistics.load(made["stats"])
    metrics, notes = choose_metrics(None, reference, offered=list(METRICS), dinov2_given=True)
    assert metrics == ["is", "fid", "sfid", "fd_dinov2"]
    assert notes == [f"Precision and Recall skipped: {made['stats']} holds no images (arr_0), which precision and "
                     "recall need"]
    with pytest.raises(UserError, match=r"^--metrics recall: .*ref.npz holds no images \(arr_0\)"):
        choose_metrics(["fid", "recall"], reference, offered=list(METRICS), dinov2_given=True)


@pytest.mark.slow
def test_evaluate_refuses_a_reference_of_other_weights_or_resolution(made, inception_weights, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=random_images(4, seed=2))
    np.savez(tmp_path / "samples24.npz", arr_0=random_images(4, size=24, seed=2))
    with pytest.raises(UserError, match="was made with inception weights of sha256 .* but random weights "
                                        r"\(random\) are in use: make it again with reference_stats.py"):
        evaluate.main([str(made["stats"]), str(tmp_path / "samples.npz"), "--inception-random-init", "--metrics",
                       "fid", "--device", "cpu"])
    with pytest.raises(UserError, match="ref.npz is a reference of 32-px images, not 24-px: make one of 24-px "
                                        r"images \(reference_stats.py --resolution 24\)"):
        evaluate.main([str(made["stats"]), str(tmp_path / "samples24.npz"), "--metrics", "fd_dinov2",
                       *flags(inception_weights)])


@pytest.mark.slow
def test_check_reference_as_a_trainer_calls_it(made, inception_weights):
    stats, batch = ReferenceStatistics.load(made["stats"]), ReferenceStatistics.load(made["adm"])
    same = FeatureExtractor(["fid", "fd_dinov2"], inception_weights=inception_weights, dinov2_random_init=True)
    check_reference(stats, 32, same)  # the weights it was made with
    with pytest.raises(UserError, match="a reference of 32-px images, not 64-px"):
        check_reference(stats, 64, same)
    with pytest.raises(UserError, match="a reference of 32-px images, not 64-px"):
        check_reference(batch, 64, same)  # an ADM batch: its images' size
    other = FeatureExtractor(["fid", "is"], inception_random_init=True)
    with pytest.raises(UserError, match="made with inception weights of sha256 "):
        check_reference(stats, 32, other)
    check_reference(batch, 32, other)  # an ADM batch records no weights
    assert other.weights_sha256() == {"inception": "random"}
    # only the networks whose statistics the extractor uses are checked: IS uses none of the reference's
    check_reference(stats, 32, FeatureExtractor(["is"], inception_random_init=True))


@pytest.mark.slow
def test_image_folder_images_h5_and_npz_give_the_same_statistics(tmp_path):
    data = make_dataset(tmp_path, resolution=32, classes=2, per_class=2)  # crops of 40x48 images
    crops = np.stack([center_crop_arr(read_rgb(path)[0], 32) for path in sorted((tmp_path / "source").glob("*/*"))])
    np.savez(tmp_path / "crops.npz", arr_0=crops)
    argv = ["--metrics", "fd_dinov2", "--dinov2-random-init", "--batch-size", "3", "--device", "cpu",
            "--num-workers", "0"]
    reference_stats.main([str(tmp_path / "source"), str(tmp_path / "folder.npz"), "--resolution", "32", *argv])
    reference_stats.main([str(data), str(tmp_path / "h5.npz"), *argv])
    reference_stats.main([str(tmp_path / "crops.npz"), str(tmp_path / "npz.npz"), "--resolution", "32", *argv])
    loaded = [ReferenceStatistics.load(tmp_path / name) for name in ("folder.npz", "h5.npz", "npz.npz")]
    for reference in loaded:
        assert set(reference.statistics) == {"dinov2"} and reference.weights_sha256 == {"dinov2": "random"}
        assert reference.num_images == 4 and reference.resolution == 32
        for ours, theirs in zip(reference.statistics["dinov2"], loaded[0].statistics["dinov2"]):
            np.testing.assert_array_equal(ours, theirs)
    assert [reference.source for reference in loaded] == [str(path.resolve()) for path in
                                                          (tmp_path / "source", data, tmp_path / "crops.npz")]


@pytest.mark.parametrize("case, message", [
    ("folder_without_resolution", "is a folder of image files (no images.h5): pass --resolution"),
    ("unreadable_file", "bad.png cannot be read (UnidentifiedImageError"),
    ("npz_of_other_size", "holds 32-px images, not --resolution 64: leave --resolution out"),
    ("one_image", "holds 1 image(s): statistics need 2 or more"),
    ("empty_folder", "no files with an image extension under it"),
    ("taken", "out.npz already exists; pass --overwrite to replace it"),
    ("missing", "nothere: no such file or folder"),
])
def test_bad_input_ends_with_one_line_and_writes_nothing(tmp_path, case, message):
    source = tmp_path / "source"
    source.mkdir()
    if case == "unreadable_file":
        for i, image in enumerate(random_images(2, size=40)):
            Image.fromarray(image).save(source / f"{i}.png")
        (source / "bad.png").write_bytes(b"not a png")
    elif case in ("npz_of_other_size", "one_image"):
        source = tmp_path / "images.npz"
        np.savez(source, arr_0=random_images(1 if case == "one_image" else 3))
    elif case == "missing":
        source = tmp_path / "nothere"
    if case == "taken":
        (tmp_path / "out.npz").write_bytes(b"keep")
    resolution = [] if case in ("folder_without_resolution", "one_image") else ["--resolution", "64" if case ==
                                                                                "npz_of_other_size" else "32"]
    argv = [str(source), str(tmp_path / "out.npz"), *resolution, "--metrics", "fd_dinov2", "--dinov2-random-init",
            "--device", "cpu", "--num-workers", "0"]
    with pytest.raises((UserError, FileNotFoundError)) as error:
        reference_stats.main(argv)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert (tmp_path / "out.npz").read_bytes() == b"keep" if case == "taken" else not (tmp_path / "out.npz").exists()
    assert [path.name for path in tmp_path.glob(".out.npz.*")] == []  # no temporary left behind


def test_overwrite_replaces_the_file(tmp_path):
    np.savez(tmp_path / "images.npz", arr_0=random_images(3))
    (tmp_path / "out.npz").write_bytes(b"old")
    written = reference_stats.main([str(tmp_path / "images.npz"), str(tmp_path / "out.npz"), "--overwrite",
                                    "--metrics", "fd_dinov2", "--dinov2-random-init", "--device", "cpu"])
    assert written == tmp_path / "out.npz"
    assert ReferenceStatistics.load(tmp_path / "out.npz").num_images == 3


def test_loader_reads_adm_batches_and_refuses_broken_files(tmp_path):
    images = random_images(5, size=16)
    mu, sigma = np.zeros(2048, np.float32), np.eye(2048)
    np.savez_compressed(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(2023),
                        sigma_s=np.eye(2023))  # compressed: the identities take kilobytes
    reference = ReferenceStatistics.load(tmp_path / "adm.npz")
    assert reference.resolution == 16 and reference.num_images == 5 and reference.weights_sha256 == {}
    np.testing.assert_array_equal(reference.statistics["pool"][1], sigma)  # used as they are
    assert reference.unavailable("precision") is None and reference.unavailable("fd_dinov2") is None
    for arrays, fragment in [
        ({"arr_0": images, "mu_dinov2": np.zeros(4)}, "holds only some precomputed statistics (no sigma_dinov2)"),
        ({"mu_dinov2": np.zeros(4), "sigma_dinov2": np.eye(3)}, "mu_dinov2 is (4,) and sigma_dinov2 (3, 3)"),
        ({"mu": mu, "sigma": sigma, "mu_s": np.zeros(7), "sigma_s": np.eye(7)}, "mu_s is (7,) and sigma_s (7, 7)"),
        ({"labels": np.zeros(3)}, "holds neither images (arr_0) nor statistics"),
    ]:
        np.savez_compressed(tmp_path / "bad.npz", **arrays)
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            ReferenceStatistics.load(tmp_path / "bad.npz")
    only_dinov2 = tmp_path / "dinov2.npz"
    np.savez(only_dinov2, mu_dinov2=np.zeros(4), sigma_dinov2=np.eye(4))
    assert ReferenceStatistics.load(only_dinov2).unavailable("fid") == (
        f"{only_dinov2} holds neither mu/sigma nor images (arr_0) to compute them")


def test_full_rank_warning():
    assert full_rank_warning(2049, 2048) is None
    assert full_rank_warning(2048, 2048) == (
        "FID of 2048 samples may use the ADM evaluator's fallback (their 2048x2048 covariance is singular); "
        "2049 or more samples give a full-rank covariance")
    assert full_rank_warning(1024, 1024, "FD-DINOv2", "images").startswith("FD-DINOv2 of 1024 images")
    extractor = FeatureExtractor(["is", "sfid", "fd_dinov2"], inception_random_init=True, dinov2_random_init=True)
    assert [warning.split(" of ")[0] for warning in extractor.covariance_warnings(300)] == ["sFID", "FD-DINOv2"]
    assert extractor.covariance_warnings(2024) == []  # above 2023 (sFID) and 384 (the small DINOv2)
