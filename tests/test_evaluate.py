"""evaluate.py and evaluation/: the ADM evaluator's formulas, the Inception features, the whole command."""
import contextlib
import json
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from scipy import linalg
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

import evaluate
from evaluation import dinov2, metrics
from evaluation.features import FeatureExtractor, compute_metrics, full_float32
from evaluation.inception import INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, InceptionV3, inception_weights_path
from evaluation.metrics import (
    fid_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    pairwise_distances,
    precision_recall,
)
from evaluation.npz import NpzImages
from evaluation.reference import ReferenceStatistics
from helpers import ROOT, assert_user_error, run_script, use_cheap_frechet
from utils.errors import report_user_errors


@pytest.fixture(scope="module")
def net(inception_weights):
    return InceptionV3(inception_weights)


def random_spd(rng, dim):
    """A random symmetric positive definite matrix."""
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def trace_sqrt_product(sigma1, sigma2):
    """tr((sigma1 sigma2)^1/2) through the symmetric form sigma1^1/2 sigma2 sigma1^1/2 (eigh only)."""
    values, vectors = np.linalg.eigh(sigma1)
    root = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T  # a singular sigma1's -1e-17 are 0
    return np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()


@contextlib.contextmanager
def float32_precisions(settings):
    """Each torch backend's float32 precision (fp32_precision) as settings gives it; the previous ones back after."""
    saved = {backend: backend.fp32_precision for backend in settings}
    for backend, precision in settings.items():
        backend.fp32_precision = precision
    try:
        yield
    finally:
        for backend, precision in saved.items():
            backend.fp32_precision = precision


def test_full_float32_sets_and_restores_each_backend_on_its_own(monkeypatch):
    def refuse():
        raise RuntimeError("PyTorch is checking the matmul precision without a specific backend name")

    # what torch's global getter does once a program used both of its precision interfaces (then allow_tf32)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", refuse)
    backends = torch.backends
    reduced = {backends.mkldnn.matmul: "bf16", backends.cuda.matmul: "tf32", backends.cudnn.conv: "tf32"}
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with float32_precisions(reduced):
        with full_float32("cpu"):
            assert {backend.fp32_precision for backend in reduced} == {"ieee"} and not torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.deterministic and not torch.is_autocast_enabled("cpu")
        assert {backend: backend.fp32_precision for backend in reduced} == reduced and torch.backends.cudnn.benchmark


def test_frechet_distance_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(1)
    # commuting covariances (same eigenvectors): sum of (sqrt(a) - sqrt(b))^2 plus the squared mean distance
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    # general covariances against the symmetric form of the trace term
    sigma1, sigma2 = random_spd(rng, 12), random_spd(rng, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * trace_sqrt_product(sigma1, sigma2))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    # scalars: N(0, 1) against N(1, 4)
    assert frechet_distance(0.0, 1.0, 1.0, 4.0) == pytest.approx(1 + 1 + 4 - 2 * 2)


def test_frechet_distance_singular_product_fallback(monkeypatch):
    rng = np.random.default_rng(2)
    sigma1, sigma2 = random_spd(rng, 6), random_spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    products, real_sqrtm = [], linalg.sqrtm

    def sqrtm_failing_once(matrix):
        products.append(matrix)
        return np.full_like(matrix, np.nan) if len(products) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm_failing_once)
    with pytest.warns(UserWarning, match="singular product; adding 1e-06 to diagonal"):
        got = frechet_distance(mu1, sigma1, mu2, sigma2)
    offset = 1e-6 * np.eye(6)
    np.testing.assert_array_equal(products[1], (sigma1 + offset) @ (sigma2 + offset))
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * trace_sqrt_product(sigma1 + offset, sigma2 + offset))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_few_samples_keeps_the_real_part_and_refuses_a_large_imaginary_one():
    # three samples in eight dimensions: rank-2 covariances, whose product's square root comes out complex with an
    # imaginary part of about 1e-8 (as with a few thousand Inception features of 2048 values)
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((3, 8)), rng.standard_normal((3, 8)) + 0.5
    (mu1, sigma1), (mu2, sigma2) = fid_statistics(first), fid_statistics(second)
    assert np.iscomplexobj(linalg.sqrtm(sigma1 @ sigma2))
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * trace_sqrt_product(sigma1, sigma2))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="Imaginary component 1.0"):  # not a covariance: no real distance
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_statistics_are_mean_and_sample_covariance():
    features = np.random.default_rng(3).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = fid_statistics(features)
    centered = features.astype(np.float64) - features.mean(0)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-6)


def naive_inception_score(probs, split_size):
    """exp(mean_i KL(p_i || mean p)) per split, averaged over splits, with plain loops."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = [sum(row[j] for row in part) / len(part) for j in range(len(part[0]))]
        kls = [sum(p * (np.log(p) - np.log(m)) for p, m in zip(row, marginal)) for row in part]
        scores.append(np.exp(sum(kls) / len(kls)))
    return sum(scores) / len(scores)


def test_inception_score():
    assert inception_score(np.full((20, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    # ten confident predictions of ten different classes: IS close to 10
    confident = np.full((10, 10), 1e-6) + np.eye(10) * (1 - 1e-5)
    assert inception_score(confident) == pytest.approx(10, rel=1e-3)
    probs = np.random.default_rng(4).dirichlet(np.ones(7), size=23)
    assert inception_score(probs, split_size=10) == pytest.approx(naive_inception_score(probs, 10), rel=1e-10)
    assert inception_score(probs) == pytest.approx(naive_inception_score(probs, 5000), rel=1e-10)


def test_pairwise_distances_float16_with_float32_fallback():
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal((6, 32)), rng.standard_normal((5, 32))
    exact = ((u[:, None] - v[None]) ** 2).sum(-1)
    got = pairwise_distances(torch.from_numpy(u), torch.from_numpy(v))
    assert got.dtype == torch.float32
    assert torch.equal(got, got.half().float())  # float16 values
    np.testing.assert_allclose(got.numpy(), exact, atol=0.05 * exact.max())
    # float16 overflows (squared norms > 65504): the block is computed in float32
    u, v = u * 1000, v * 1000
    got = pairwise_distances(torch.from_numpy(u), torch.from_numpy(v))
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), exact * 1e6, rtol=1e-4)


def lattice_points(rng, count, dim=6, low=0, high=6):
    """Integer points with small coordinates: every squared distance is exact in float16."""
    return rng.integers(low, high, (count, dim)).astype(np.float32)


def squared_distances(a, b):
    """Exact squared distances (float64)."""
    return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)


def naive_radii(features, k):
    """Squared distance to the k-th nearest neighbour, the point itself being the 0-th."""
    return np.sort(squared_distances(features, features), axis=1)[:, k]


def naive_precision_recall(ref, samples, k):
    """Fraction of samples inside some reference ball, and of references inside some sample ball."""
    distances, ref_radii, sample_radii = squared_distances(ref, samples), naive_radii(ref, k), naive_radii(samples, k)
    precision = np.mean([(distances[:, j] <= ref_radii).any() for j in range(len(samples))])
    recall = np.mean([(distances[i] <= sample_radii).any() for i in range(len(ref))])
    return precision, recall


def test_manifold_radii_are_kth_neighbour_distances():
    features = lattice_points(np.random.default_rng(6), 40)
    for k in (1, 3):
        np.testing.assert_array_equal(manifold_radii(features, k), naive_radii(features, k))
    # blocks of 7 rows and columns give what one block gives
    np.testing.assert_array_equal(manifold_radii(features, 3, batch_size=7), manifold_radii(features, 3))
    with pytest.raises(ValueError, match="more than k=3"):
        manifold_radii(features[:3])


def test_precision_recall_of_shifted_point_clouds():
    rng = np.random.default_rng(7)
    ref = lattice_points(rng, 30)
    far = ref + np.float32(100)
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, far) == (0.0, 0.0)
    # half the samples are the references, half lie far away: precision 1/2, every reference is covered
    assert precision_recall(ref, np.concatenate([ref, far])) == (0.5, 1.0)
    # a sample set holding half the references: all samples are on the reference manifold
    precision, recall = precision_recall(ref, ref[:15])
    assert precision == 1.0 and 0.5 <= recall < 1.0


def test_precision_recall_matches_naive_estimator():
    rng = np.random.default_rng(8)
    ref, samples = lattice_points(rng, 37), lattice_points(rng, 23, low=1, high=7)
    expected = naive_precision_recall(ref, samples, 3)
    assert precision_recall(ref, samples) == pytest.approx(expected, abs=0)
    assert precision_recall(ref, samples, batch_size=5) == pytest.approx(expected, abs=0)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def random_images(count, size=24, seed=0):
    """uint8 (count, size, size, 3) images."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_inception_features_shapes(net):
    pool, spatial, probs = net.activations(random_images(3))
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17 * 17 * 7) and probs.shape == (3, 1008)
    assert pool.dtype == spatial.dtype == probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert pool.std(0).mean() > 0  # unit-scale random weights: features depend on the image


@pytest.mark.slow
def test_inception_features_do_not_depend_on_batching(net):
    images = random_images(4, seed=1)
    whole = net.activations(images)
    parts = [np.concatenate(x) for x in zip(net.activations(images[:1]), net.activations(images[1:]))]
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_inception_features_are_pool3_and_mixed_6_conv(net):
    images = random_images(2, size=40, seed=2)
    pool, spatial, probs = net.activations(images)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        reference_pool, logits = net(nchw)  # torch-fidelity's own forward on NCHW uint8
        # run the network by hand up to Mixed_6d's 1x1 branch: TF mixed_6/conv
        x = interpolate_bilinear_2d_like_tensorflow1x(nchw.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(net, name)(x)
        mixed_6_conv = net.Mixed_6d.branch1x1(x)
    assert mixed_6_conv.shape == (2, 192, 17, 17)
    expected_spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # NHWC, as TensorFlow flattens
    np.testing.assert_allclose(spatial, expected_spatial.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool, reference_pool.numpy(), rtol=1e-6)
    # the Inception Score's probabilities: softmax of pool_3 times the logits weights, no bias
    np.testing.assert_allclose(probs, torch.softmax(reference_pool @ net.fc.weight.T, 1).numpy(), rtol=1e-5)


def test_inception_takes_uint8_nhwc_only(net):
    with pytest.raises(ValueError, match="uint8 images"):
        net.activations(random_images(1).astype(np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        net.activations(random_images(1).transpose(0, 3, 1, 2))


def test_inception_weights_lookup(tmp_path, monkeypatch, inception_weights):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as error:
        inception_weights_path()
    message = str(error.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_weights)
    assert inception_weights_path() == cached
    monkeypatch.setenv(INCEPTION_ENV, str(inception_weights))
    assert inception_weights_path() == inception_weights
    assert inception_weights_path(str(cached)) == cached
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        inception_weights_path(str(tmp_path / "missing.pth"))


def test_inception_rejects_other_weights(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="other.pth is no " + INCEPTION_FILE):
        InceptionV3(path)


def test_npz_images_memory_mapped_or_streamed(tmp_path):
    images = random_images(7, size=8)
    np.savez(tmp_path / "stored.npz", arr_0=images, mu=np.zeros(2))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    stored, compressed = NpzImages(tmp_path / "stored.npz"), NpzImages(tmp_path / "compressed.npz")
    assert isinstance(stored.memmap, np.memmap) and compressed.memmap is None
    for reader in (stored, compressed):
        batches = list(reader.batches(3))
        assert len(reader) == 7 and [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)


@pytest.mark.parametrize("arrays, message", [
    ({"images": random_images(2)}, "has no 'arr_0' array \\(it holds images\\)"),
    ({"arr_0": random_images(2).astype(np.float32)}, "expected uint8 images"),
    ({"arr_0": random_images(2)[..., 0]}, "expected uint8 images"),
])
def test_npz_images_rejects_bad_files(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        NpzImages(tmp_path / "bad.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="text.npz is no .npz file"):
        NpzImages(tmp_path / "text.npz")


def test_script_imports_no_torch_before_parsing():
    code = "import sys, evaluate, eval_vae, reference_stats, visualize_latents; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("setup, message", [
    ("missing", "nothere.npz: no such file"),
    ("bad_key", "has no 'arr_0' array"),
    ("sizes", "score samples against the reference batch of their resolution"),
    ("partial_stats", "holds only some precomputed statistics (no mu_s, sigma_s)"),
    ("no_weights", f"Inception weights {INCEPTION_FILE} not found"),
    ("no_weights", "at the file, or pass --inception-random-init (smoke runs)"),
])
def test_evaluate_bad_input_ends_with_one_line(tmp_path, monkeypatch, setup, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, arr_0=random_images(4), **({"mu": np.zeros(2), "sigma": np.eye(2)} if setup == "partial_stats"
                                              else {}))
    np.savez(samples, **({"images": random_images(4)} if setup == "bad_key" else
                         {"arr_0": random_images(4, size=32 if setup == "sizes" else 24)}))
    argv = [str(ref), str(tmp_path / "nothere.npz" if setup == "missing" else samples), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(evaluate.main)(argv)
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert "\n" not in str(exit_info.value)


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: no CUDA device is available here; pass --device cpu"),
    ("cuda:1", "--device cuda:1: no CUDA device is available here; pass --device cpu"),
    ("gpu", "--device gpu: not a device; pass cuda or cpu"),
])
def test_evaluate_unusable_device_ends_with_one_line(tmp_path, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    np.savez(tmp_path / "ref.npz", arr_0=random_images(2))
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(evaluate.main)([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--device", device,
                                           "--inception-random-init"])
    assert str(exit_info.value) == "error: " + message


def test_evaluate_bad_file_ends_with_one_line(tmp_path):
    (tmp_path / "ref.npz").write_text("not a zip")
    result = run_script("evaluate.py", tmp_path / "ref.npz", tmp_path / "ref.npz", "--json", tmp_path / "out.json",
                        check=False, cwd=tmp_path)
    assert_user_error(result, f"{tmp_path / 'ref.npz'} is no .npz file")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_evaluate_command(tmp_path, net, inception_weights, monkeypatch, capsys):
    # no DINOv2 weights on this machine: the default metrics are the ADM evaluator's five
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("REPAE_ENCODER_CKPT_DINOV2_VIT_L", raising=False)
    ref_images, sample_images = random_images(6, size=32, seed=3), random_images(7, size=32, seed=4)
    # Precomputed reference statistics are used as they are; zero covariances keep the 2048x2048 matrix square
    # roots cheap (seconds instead of a minute on two cores), the expected distances closed-form and the file small.
    ref_mu, ref_mu_s = np.full(2048, 0.01, dtype=np.float32), np.zeros(2023, dtype=np.float32)
    np.savez_compressed(tmp_path / "ref.npz", arr_0=ref_images, mu=ref_mu, sigma=np.zeros((2048, 2048)), mu_s=ref_mu_s,
                        sigma_s=np.zeros((2023, 2023)))
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)
    returned = evaluate.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--inception-weights",
                              str(inception_weights), "--batch-size", "3", "--device", "cpu", "--json",
                              str(tmp_path / "out.json")])
    printed, notes = capsys.readouterr()
    numbers = json.loads((tmp_path / "out.json").read_text())
    assert numbers == returned and "fd_dinov2" not in numbers
    assert "note: FD-DINOv2 skipped: DINOv2 weights dinov2_vitl14_pretrain.pth (FD-DINOv2) not found" in notes

    ref_pool = net.activations(ref_images)[0]
    pool, spatial, probs = net.activations(sample_images)
    expected = {
        "inception_score": naive_inception_score(probs.astype(np.float64), 5000),
        "fid": np.sum((pool.mean(0) - ref_mu) ** 2) + np.trace(np.cov(pool, rowvar=False)),
        "sfid": np.sum((spatial.mean(0) - ref_mu_s) ** 2) + np.trace(np.cov(spatial, rowvar=False)),
    }
    for key, value in expected.items():
        assert numbers[key] == pytest.approx(value, rel=1e-3), key
    assert (numbers["precision"], numbers["recall"]) == precision_recall(ref_pool, pool)
    assert numbers["num_ref"] == 6 and numbers["num_samples"] == 7
    assert numbers["inception_weights"] == str(inception_weights)
    printed = dict(line.split(": ") for line in printed.splitlines() if line.count(": ") == 1)
    assert [float(printed[name]) for name in ("Inception Score", "FID", "sFID", "Precision", "Recall")] == [
        numbers[key] for key in ("inception_score", "fid", "sfid", "precision", "recall")]


def test_metrics_flag_takes_a_comma_list_of_known_names(capsys):
    parser = evaluate.build_parser()
    assert parser.parse_args(["r", "s", "--metrics", "fd_dinov2, fid"]).metrics == ["fid", "fd_dinov2"]
    assert parser.parse_args(["r", "s"]).metrics is None
    with pytest.raises(SystemExit):
        parser.parse_args(["r", "s", "--metrics", "fid,kid"])
    assert "give a comma list of is, fid, sfid, precision, recall, fd_dinov2" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_gives_the_numbers_a_training_loop_gets(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setattr(dinov2, "DINOV2_ENCODER", "dinov2-vit-s")  # a small ViT for the ViT-L/14
    use_cheap_frechet(monkeypatch)
    np.savez(tmp_path / "ref.npz", arr_0=random_images(5, size=32, seed=5))
    samples = random_images(4, size=32, seed=6)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    wanted = ["is", "sfid", "precision", "recall", "fd_dinov2"]
    results = evaluate.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--metrics", ",".join(wanted),
                             "--inception-weights", str(inception_weights), "--dinov2-random-init", "--batch-size", "3",
                             "--device", "cpu"])
    assert results["inception_weights"] == str(inception_weights) and results["dinov2_weights"] == "random"

    # a training loop: one extractor, its samples NCHW tensors seen as NHWC, under autocast and reduced precision
    extractor = FeatureExtractor(wanted, "cpu", inception_weights=inception_weights, dinov2_random_init=True)
    reference = ReferenceStatistics.load(tmp_path / "ref.npz").prepare(extractor, batch_size=3)
    nchw = torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous()
    reduced = {torch.backends.mkldnn.matmul: "bf16", torch.backends.cuda.matmul: "tf32"}
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with float32_precisions(reduced), torch.autocast("cpu", dtype=torch.bfloat16):
        parts = [extractor(nchw[start:start + 3].permute(0, 2, 3, 1)) for start in (0, 3)]
        unguarded = extractor.networks["dinov2"].features(nchw[:1].permute(0, 2, 3, 1))
        # the caller's settings are back
        assert {backend: backend.fp32_precision for backend in reduced} == reduced and torch.backends.cudnn.benchmark
    assert not np.array_equal(unguarded, parts[0]["dinov2"][:1])  # autocast would have changed the features
    features = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    numbers = compute_metrics(features, reference, wanted)
    assert list(numbers) == ["inception_score", "sfid", "precision", "recall", "fd_dinov2"]
    assert numbers == {key: results[key] for key in numbers}
