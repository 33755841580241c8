"""Evaluation during training: the numbers of generate.py + evaluate.py on the same checkpoint, the same on one and
two processes, resumed runs that append to eval.jsonl at the same steps, and bad input refused before training.

In-process tests replace the Frechet distance by a cheap function of every mean and covariance value
(helpers.cheap_frechet), which still tells apart any two sets of features.
"""
import json
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import generate
from evaluation import dinov2
from helpers import (
    TINY_VAE,
    assert_same_state,
    assert_user_error,
    run_script,
    tiny_repae_flags,
    tiny_training_flags,
    use_cheap_frechet,
)
from weights.checkpoint import load_file

pytestmark = pytest.mark.slow

EVAL = {"--eval-num-samples": 6, "--eval-batch-size": 4, "--eval-steps": 2, "--eval-cfg-scale": 1.0}


@pytest.fixture(autouse=True)
def quick_metrics(monkeypatch):
    """Cheap Frechet distances and a ViT-S instead of the ViT-L for FD-DINOv2, in this process."""
    use_cheap_frechet(monkeypatch)
    monkeypatch.setattr(dinov2, "DINOV2_ENCODER", "dinov2-vit-s")


def ldm_flags(ldm_run, out, name, reference, **overrides):
    """train_ldm_only.py flags on the session pipeline's latents, evaluating every 2 steps."""
    ref, weights = reference
    flags = {"--vae-ckpt": ldm_run / "pretrained" / "e2e" / "e2e.pt", "--vae-latents-name": "e2e",
             "--max-train-steps": 2, "--checkpointing-steps": 2, "--eval-every": 2, "--eval-ref": ref,
             "--inception-weights": weights, **EVAL, **overrides}
    return tiny_training_flags(ldm_run / "data", out, name, **flags)


def eval_lines(exp):
    """The records of EXP/eval.jsonl."""
    return [json.loads(line) for line in (exp / "eval.jsonl").read_text().splitlines()]


def test_in_training_numbers_are_those_of_generate_and_evaluate(ldm_run, reference, tmp_path):
    run_script("train_ldm_only.py", *ldm_flags(ldm_run, tmp_path, "ldm", reference), "--dinov2-random-init")
    exp = tmp_path / "ldm"
    (record,) = eval_lines(exp)
    assert record["step"] == 2 and record["samples"] == 6 and record["seconds"] > 0
    assert {"inception_score", "fid", "sfid", "fd_dinov2"} <= record.keys()
    log = (exp / "log.txt").read_text()
    assert "Evaluation at step 2" in log
    # six samples of 2048 features: said once at the start, and the numbers still come (the ADM fallback)
    assert "--eval-num-samples 6: FID of 6 samples may use the ADM evaluator's fallback" in log

    npz = generate.main(["--exp-path", str(exp), "--sample-dir", str(tmp_path / "samples"), "--num-fid-samples", "6",
                         "--pproc-batch-size", "4", "--num-steps", "2", "--cfg-scale", "1.0", "--mode", "ode"])
    ref, weights = reference
    scored = evaluate.main([str(ref), str(npz), "--inception-weights", str(weights), "--metrics", "is,fid,sfid",
                            "--batch-size", "4", "--device", "cpu"])
    for key in ("inception_score", "fid", "sfid"):
        assert record[key] == pytest.approx(scored[key], rel=1e-5), key


def test_two_processes_give_the_numbers_of_one_and_a_resume_evaluates_at_the_same_steps(ldm_run, reference,
                                                                                       tmp_path):
    one = ldm_flags(ldm_run, tmp_path, "one", reference, **{"--max-train-steps": 4, "--eval-metrics": "is,fid"})
    run_script("train_ldm_only.py", *one)
    straight = eval_lines(tmp_path / "one")
    assert [record["step"] for record in straight] == [2, 4]

    # Stopped after step 2 (its evaluation done), resumed to 4: eval.jsonl goes on as in the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", resumed, ignore=lambda folder, names: [
        name for name in names if name == "0000004.pt"])
    (resumed / "eval.jsonl").write_text((tmp_path / "one" / "eval.jsonl").read_text().splitlines()[0] + "\n")
    run_script("train_ldm_only.py", *ldm_flags(ldm_run, tmp_path, "resumed", reference, **{
        "--max-train-steps": 4, "--eval-metrics": "is,fid"}), "--resume-latest")
    again = eval_lines(resumed)
    assert [record["step"] for record in again] == [2, 4]
    assert {key: again[1][key] for key in ("inception_score", "fid")} == \
        {key: straight[1][key] for key in ("inception_score", "fid")}
    # the evaluation at step 2 left the training's random streams alone: the weights are those of the resumed run
    for key in ("model", "ema", "opt"):
        assert_same_state(load_file(tmp_path / "one" / "checkpoints" / "0000004.pt")[key],
                          load_file(resumed / "checkpoints" / "0000004.pt")[key], key)

    # The weights of step 2 evaluated by two gloo processes: the samples are dealt out, the numbers are the same.
    two = tmp_path / "two"
    shutil.copytree(tmp_path / "one", two, ignore=lambda folder, names: [
        name for name in names if name in ("0000004.pt", "eval.jsonl")])
    run_script("train_ldm_only.py", *ldm_flags(ldm_run, tmp_path, "two", reference, **{"--eval-metrics": "is"}),
               "--resume-latest", nproc=2)
    (record,) = eval_lines(two)
    assert record["step"] == 2 and record["inception_score"] == straight[0]["inception_score"]


def test_repae_reports_the_vaes_reconstructions_as_eval_vae_does(tiny_data, reference, tmp_path):
    ref, weights = reference
    run_script("train_repae.py", *tiny_repae_flags(tiny_data, tmp_path, "repae", **{
        "--max-train-steps": 2, "--checkpointing-steps": 2, "--eval-every": 2, "--eval-ref": ref,
        "--inception-weights": weights, "--eval-metrics": "is", "--report-to": "tensorboard", **EVAL}))
    (record,) = eval_lines(tmp_path / "repae")
    accumulator = EventAccumulator(str(next((tmp_path / "logs" / "repae").rglob("events.out.tfevents.*"))))
    accumulator.Reload()
    curves = {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    assert curves["eval/inception_score"] == curves["eval/recon_psnr"] == [2]  # the trackers' curves
    assert record["recon_images"] == 6 and {"recon_psnr", "recon_ssim", "recon_lpips", "recon_rfid"} <= record.keys()
    exported = tmp_path / "pretrained"
    run_script("save_vae_weights.py", "--repae-ckpt", tmp_path / "repae" / "checkpoints" / "0000002.pt",
               "--vae-name", "e2e", "--save-dir", exported)
    table = run_script("eval_vae.py", "--vae", TINY_VAE, "--vae-ckpt", exported / "e2e" / "e2e.pt",
                       "--data-dir", tiny_data, "--num-images", 6, "--batch-size", 4, "--num-workers", 0,
                       "--inception-weights", weights, "--lpips-random-init", "--device", "cpu",
                       "--json", tmp_path / "vae.json")
    assert table.returncode == 0
    (row,) = json.loads((tmp_path / "vae.json").read_text()).values()
    for key in ("psnr", "ssim", "rfid"):  # LPIPS too, but from another random trunk here
        assert record[f"recon_{key}"] == pytest.approx(row[key], rel=1e-6), key


@pytest.mark.parametrize("case, message", [
    ("no-ref", "--eval-every 2 needs --eval-ref"),
    ("other-resolution", "is a reference of 64-px images, not 32-px"),
    ("no-inception", "Inception weights"),
])
def test_bad_evaluation_input_is_refused_before_training(ldm_run, reference, tmp_path, case, message):
    np.savez(tmp_path / "adm-64.npz", arr_0=np.zeros((2, 64, 64, 3), np.uint8))  # an ADM batch of 64-px images
    overrides = {"no-ref": {"--eval-ref": None}, "other-resolution": {"--eval-ref": tmp_path / "adm-64.npz"},
                 "no-inception": {"--inception-weights": tmp_path / "missing.pth"}}[case]
    result = run_script("train_ldm_only.py", *ldm_flags(ldm_run, tmp_path, "refused", reference, **overrides),
                        check=False)
    assert_user_error(result, message)
    assert not (tmp_path / "refused").exists()
