"""End-to-end runs of train_repae.py on a tiny CPU configuration (its step alone: test_repae_step.py).

Expensive runs are shared: the session's `repae_run` (6 steps, checkpoints at 3 and 6; conftest.py) serves the
layout, resume and published-resume tests; `ddp` (2 gloo processes) serves the batch-norm and two-process resume
tests.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import (
    ROOT,
    TINY_LOSS_CONFIG,
    TINY_VAE,
    assert_same_state,
    assert_user_error,
    first_state,
    run_script,
    save_vae_file,
    tiny_repae_flags,
    tiny_training_flags,
)
from loss.discriminator import NLayerDiscriminator
from models.autoencoder import vae_models
from models.sit import SiT_models
from shared import shared_folder
from weights.checkpoint import load_file

pytestmark = pytest.mark.slow

STATS = {"latents_scale": torch.full((1, 4, 1, 1), 2.0), "latents_bias": torch.full((1, 4, 1, 1), 0.1)}


@pytest.fixture(scope="session")
def data_dir(tiny_data):
    """The session's 16-image, 2-class dataset at 32 px: 4 batches of 4 per epoch."""
    return tiny_data


def copy_experiment_until(exp, copy, step):
    """A copy of experiment folder exp as a run stopped at `step` left it: its checkpoints up to that step."""
    shutil.copytree(exp, copy, ignore=lambda folder, names: [
        name for name in names if folder.endswith("checkpoints") and int(name.split(".")[0]) > step])
    return copy


def train(data_dir, out, name, *extra, nproc=1, check=True, env=None, **overrides):
    """Run train_repae.py with the tiny flags; returns the CompletedProcess."""
    args = tiny_repae_flags(data_dir, out, name, **overrides) + list(extra)
    return run_script("train_repae.py", *args, nproc=nproc, check=check, env=env)


@pytest.fixture(scope="session")
def base(repae_run):
    """The session's finished 6-step run, which tests only read (or leave as it was): (out dir, console output)."""
    return repae_run.parent, (repae_run / "console.txt").read_text()


@pytest.fixture(scope="session")
def deterministic_vae(tmp_path_factory):
    """A tiny VAE whose posterior std is exp(-15): its latents are (almost) a function of the image."""

    def build(folder):
        torch.manual_seed(0)
        vae = vae_models[TINY_VAE]()
        with torch.no_grad():
            logvar = slice(4, 8)  # moments are mean channels then log-variance channels
            vae.quant_conv.weight[logvar] = 0.0
            vae.quant_conv.bias[logvar] = -40.0  # clamped to -30: no gradient reaches it
        save_vae_file(folder / "det.pt", vae, STATS)

    return shared_folder(tmp_path_factory, "deterministic_vae", build) / "det.pt"


@pytest.fixture(scope="session")
def ddp(data_dir, deterministic_vae, tmp_path_factory):
    """4 steps on 2 gloo processes with a checkpoint every step, made once per session; returns the out dir.
    Started by torchrun without accelerate's settings: on a machine without CUDA it still runs as its 2 processes."""

    def build(out):
        train(data_dir, out, "straight", nproc=2, env={"ACCELERATE_USE_CPU": None},
              **{"--vae-ckpt": deterministic_vae, "--max-train-steps": 4, "--checkpointing-steps": 1,
                 "--sampling-steps": 2})

    return shared_folder(tmp_path_factory, "ddp", build)


def test_short_run_writes_published_layout(base):
    out, console = base
    exp = out / "base"
    args = json.loads((exp / "args.json").read_text())
    assert args["model"] == "SiT-P/2" and args["vae_align_proj_coeff"] == 1.5 and args["enc_type"] == "dinov2-vit-s"
    assert "0000006.pt at step 6; losses logged at step 6: sit_loss=" in (exp / "log.txt").read_text()
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000003.pt", "0000006.pt"]
    assert sorted(p.name for p in (exp / "samples").iterdir()) == ["0000001.png", "0000003.png", "0000006.png"]

    ckpt = load_file(exp / "checkpoints" / "0000006.pt")
    assert {"model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps"} <= ckpt.keys()
    assert ckpt["steps"] == 6 and ckpt["args"].model == "SiT-P/2"
    sit = SiT_models["SiT-P/2"](input_size=4, in_channels=4, num_classes=2, z_dims=[384], encoder_depth=2)
    assert torch.equal(ckpt["model"]["pos_embed"], sit.pos_embed)  # the sin-cos embedding stays fixed
    sit.load_state_dict(ckpt["ema"], strict=True)
    sit.load_state_dict(ckpt["model"], strict=True)
    vae_models[TINY_VAE]().load_state_dict(ckpt["vae"], strict=True)
    NLayerDiscriminator(ndf=8).load_state_dict(ckpt["discriminator"], strict=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # Every optimizer took 6 steps; the EMA has moved, but less than the model.
    assert all(first_state(ckpt[key])["step"] == 6 for key in ("opt", "opt_vae", "opt_disc"))
    assert not torch.equal(ckpt["ema"]["blocks.0.attn.qkv.weight"], ckpt["model"]["blocks.0.attn.qkv.weight"])
    # 16 images in batches of 4: step 6 is batch 2 of epoch 1.
    assert ckpt["data"] == {"epoch": 1, "batch_in_epoch": 2, "layout": [1, 4]}
    assert "sit_loss=" in console  # progress bar with the main losses


def test_resume_reaches_the_same_weights(data_dir, base, tmp_path):
    # Stopped after step 3 (epoch 0) and resumed to step 6 (epoch 1): the resume crosses an epoch boundary.
    stopped = copy_experiment_until(base[0] / "base", tmp_path / "stopped", 3)
    train(data_dir, tmp_path, "stopped", "--resume-latest", **{"--max-train-steps": 6, "--checkpointing-steps": 3,
                                                               "--sampling-steps": 3})
    assert "Resumed from" in (stopped / "log.txt").read_text()
    # The experiment's args.json stays that of its first start; each resume's flags are kept beside it.
    assert (stopped / "args.json").read_text() == (base[0] / "base" / "args.json").read_text()
    resumed_args = json.loads((stopped / "args-resume-0000003.json").read_text())
    assert resumed_args["exp_name"] == "stopped" and resumed_args["resume_latest"]
    straight = load_file(base[0] / "base" / "checkpoints" / "0000006.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000006.pt")
    for key in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "rng", "data", "guard"):
        assert_same_state(straight[key], again[key], key)


def test_published_resume_flags(data_dir, base, tmp_path):
    first = base[0] / "base"
    train(data_dir, tmp_path, "second", **{"--max-train-steps": 4, "--resume-step": 3,
                                          "--continue-train-exp-dir": first})
    assert load_file(tmp_path / "second" / "checkpoints" / "0000004.pt")["steps"] == 4
    missing = train(data_dir, tmp_path, "third", check=False, **{"--resume-step": 7,
                                                                 "--continue-train-exp-dir": first})
    assert missing.returncode != 0 and "0000007.pt" in missing.stderr


def test_fresh_run_never_overwrites_checkpoints(data_dir, base):
    out = base[0]
    before = {p.name: p.read_bytes() for p in (out / "base" / "checkpoints").iterdir()}
    again = train(data_dir, out, "base", check=False, **{"--max-train-steps": 2})
    assert again.returncode != 0 and "--resume-latest" in again.stderr
    assert {p.name: p.read_bytes() for p in (out / "base" / "checkpoints").iterdir()} == before


def test_resume_from_a_published_checkpoint(data_dir, base, tmp_path):
    ours = load_file(base[0] / "base" / "checkpoints" / "0000003.pt")
    published_keys = ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps")
    published = tmp_path / "published" / "checkpoints" / "0000003.pt"
    published.parent.mkdir(parents=True)
    torch.save({key: ours[key] for key in published_keys}, published)
    result = train(data_dir, tmp_path, "continued", **{"--max-train-steps": 4, "--resume-step": 3,
                                                       "--continue-train-exp-dir": tmp_path / "published"})
    assert "holds no random and data state" in result.stderr
    resumed = load_file(tmp_path / "continued" / "checkpoints" / "0000004.pt")
    assert resumed["steps"] == 4 and first_state(resumed["opt"])["step"] == 4
    # Step 3 ended after batch 3 of epoch 0, so step 4 used batch 4, the last of epoch 0.
    assert resumed["data"]["epoch"] == 0 and resumed["data"]["batch_in_epoch"] == 4


def test_batchnorm_statistics_cover_the_global_batch(data_dir, deterministic_vae, ddp, tmp_path):
    # One process on the same 4 images as the two processes' first step (2 each): same latents, same statistics.
    train(data_dir, tmp_path, "one", **{"--vae-ckpt": deterministic_vae, "--max-train-steps": 1,
                                        "--checkpointing-steps": 1})
    one = load_file(tmp_path / "one" / "checkpoints" / "0000001.pt")["model"]
    two = load_file(ddp / "straight" / "checkpoints" / "0000001.pt")["model"]
    assert two["bn.num_batches_tracked"] == 1
    assert not torch.allclose(two["bn.running_mean"], torch.full((4,), 0.1))  # the statistics moved
    torch.testing.assert_close(two["bn.running_mean"], one["bn.running_mean"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two["bn.running_var"], one["bn.running_var"], atol=1e-5, rtol=1e-5)


def test_two_process_resume_is_exact(data_dir, deterministic_vae, ddp, tmp_path):
    flags = {"--vae-ckpt": deterministic_vae, "--checkpointing-steps": 1, "--sampling-steps": 2}
    copy_experiment_until(ddp / "straight", tmp_path / "stopped", 2)
    train(data_dir, tmp_path, "stopped", "--resume-latest", nproc=2, **{**flags, "--max-train-steps": 4})
    straight = load_file(ddp / "straight" / "checkpoints" / "0000004.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000004.pt")
    assert len(straight["rng"]) == 2 and not torch.equal(straight["rng"][0]["torch"], straight["rng"][1]["torch"])
    assert (ddp / "straight" / "samples" / "0000004.png").is_file()
    for key in ("model", "ema", "vae", "discriminator", "opt", "rng"):
        assert_same_state(straight[key], again[key], key)


def test_nonfinite_run_stops_without_checkpoint(data_dir, tmp_path):
    vae = vae_models[TINY_VAE]()
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    nan_vae = save_vae_file(tmp_path / "nan-vae.pt", vae, STATS)
    result = train(data_dir, tmp_path, "nan", check=False, **{"--vae-ckpt": nan_vae, "--max-nonfinite-steps": 2})
    assert result.returncode != 0
    assert "2 consecutive steps had a non-finite loss or gradient" in result.stderr
    assert "update skipped" in (tmp_path / "nan" / "log.txt").read_text()
    assert not list((tmp_path / "nan" / "checkpoints").iterdir())


def test_bf16_autocast_trains_the_same_recipe(data_dir, base, tmp_path):
    train(data_dir, tmp_path, "bf16", **{"--mixed-precision": "bf16", "--max-train-steps": 3,
                                         "--checkpointing-steps": 3})
    bf16 = load_file(tmp_path / "bf16" / "checkpoints" / "0000003.pt")
    fp32 = load_file(base[0] / "base" / "checkpoints" / "0000003.pt")
    key = "blocks.0.attn.qkv.weight"
    assert bf16["model"][key].dtype == torch.float32  # master weights stay fp32
    # Same start and data: after 3 AdamW steps of lr 1e-4 the weights differ by rounding, not by recipe.
    assert not torch.equal(bf16["model"][key], fp32["model"][key])
    torch.testing.assert_close(bf16["model"][key], fp32["model"][key], atol=1e-3, rtol=0)
    torch.testing.assert_close(bf16["vae"]["encoder.conv_in.weight"], fp32["vae"]["encoder.conv_in.weight"],
                               atol=1e-3, rtol=0)


def test_trackers_wandb_offline_and_tensorboard(data_dir, tmp_path):
    train(data_dir, tmp_path, "tracked", env={"WANDB_DIR": str(tmp_path)},
          **{"--report-to": "wandb,tensorboard", "--max-train-steps": 2, "--sampling-steps": 2})
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    events = list((tmp_path / "logs" / "tracked").rglob("events.out.tfevents.*"))
    scalars = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        scalars.update({tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]})
    assert [event.step for event in scalars["sit_loss"]] == [1, 2]
    assert {"vae_loss", "d_loss", "proj_loss", "grad_norm_sit", "skipped_updates"} <= scalars.keys()


def test_ablation_switches_run(data_dir, deterministic_vae, tmp_path):
    train(data_dir, tmp_path, "frozen", "--freeze-vae", **{"--vae-ckpt": deterministic_vae, "--max-train-steps": 2})
    frozen = load_file(tmp_path / "frozen" / "checkpoints" / "0000002.pt")
    assert_same_state(frozen["vae"], load_file(deterministic_vae), "vae")  # the VAE never moved
    assert first_state(frozen["opt"])["step"] == 2
    train(data_dir, tmp_path, "nostop", "--diffusion-loss-to-vae", "--log-latent-stats",
          **{"--report-to": "tensorboard", "--max-train-steps": 1, "--checkpointing-steps": 1})
    accumulator = EventAccumulator(str(next((tmp_path / "logs" / "nostop").rglob("events.out.tfevents.*"))))
    accumulator.Reload()
    assert {"latent_mean/c0", "latent_std/c3", "latent_std_min"} <= set(accumulator.Tags()["scalars"])


def test_gradient_accumulation_counts_optimization_steps(data_dir, tmp_path):
    train(data_dir, tmp_path, "accum", **{"--gradient-accumulation-steps": 2, "--max-train-steps": 2,
                                          "--batch-size": 4})
    ckpt = load_file(tmp_path / "accum" / "checkpoints" / "0000002.pt")
    # 2 optimization steps of 2 micro-batches each: the data position is 4 micro-batches into epoch 0.
    assert ckpt["steps"] == 2 and ckpt["data"] == {"epoch": 0, "batch_in_epoch": 4, "layout": [1, 4]}
    assert first_state(ckpt["opt"])["step"] == 2 and first_state(ckpt["opt_vae"])["step"] == 2


def test_fp16_on_cpu_resumes_exactly_with_its_scaler(data_dir, tmp_path):
    flags = {"--mixed-precision": "fp16", "--checkpointing-steps": 1}
    train(data_dir, tmp_path, "straight", **{**flags, "--max-train-steps": 2})
    copy_experiment_until(tmp_path / "straight", tmp_path / "stopped", 1)
    train(data_dir, tmp_path, "stopped", "--resume-latest", **{**flags, "--max-train-steps": 2})
    straight = load_file(tmp_path / "straight" / "checkpoints" / "0000002.pt")
    again = load_file(tmp_path / "stopped" / "checkpoints" / "0000002.pt")
    assert straight["scaler"]["scale"] == 2.0 ** 16  # torch's initial scale: no overflow, no growth yet
    for key in ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "scaler", "rng"):
        assert_same_state(straight[key], again[key], key)


def test_resume_with_the_wrong_model_leaves_the_experiment_as_it_was(data_dir, base):
    exp = base[0] / "base"
    before = {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file()}
    result = train(data_dir, base[0], "base", "--resume-latest", check=False, **{"--model": "SiT-T/4"})
    assert_user_error(result, "0000006.pt", "[model] does not fit")
    assert {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file()} == before


def test_resume_latest_skips_an_unreadable_checkpoint_and_cleans_interrupted_writes(data_dir, base, tmp_path):
    exp = tmp_path / "copy"
    shutil.copytree(base[0] / "base", exp)
    newest = exp / "checkpoints" / "0000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a damaged file
    stale = exp / "checkpoints" / ".0000009.pt.k2j4h1.tmp"  # what a killed write leaves
    stale.write_bytes(b"partial")
    result = train(data_dir, tmp_path, "copy", "--resume-latest", **{"--max-train-steps": 4})
    assert "0000006.pt" in result.stderr and "unreadable" in result.stderr
    assert "Resumed from" in (exp / "log.txt").read_text() and "0000003.pt at step 3" in (exp / "log.txt").read_text()
    assert load_file(exp / "checkpoints" / "0000004.pt")["steps"] == 4
    assert not stale.exists()


def test_runs_from_any_working_folder(data_dir, tmp_path):
    # A relative --loss-cfg-path (the default is one) is read from the repository, not from the working folder.
    flags = {"--max-train-steps": 1, "--loss-cfg-path": TINY_LOSS_CONFIG.relative_to(ROOT)}
    assert not (tmp_path / flags["--loss-cfg-path"]).exists()
    run_script("train_repae.py", *tiny_training_flags(data_dir, tmp_path, "elsewhere", **flags), "--lpips-random-init",
               cwd=tmp_path)
    assert (tmp_path / "elsewhere" / "checkpoints" / "0000001.pt").is_file()


def test_a_run_ended_by_its_epochs_checkpoints_its_last_step_and_resumes_keep_their_records(data_dir, tmp_path):
    flags = {"--max-train-steps": 50, "--epochs": 2, "--checkpointing-steps": 3}  # 2 epochs of 4 steps end it
    train(data_dir, tmp_path, "epochs", **flags)
    exp = tmp_path / "epochs"
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000003.pt", "0000006.pt", "0000008.pt"]
    assert "Done (completed --epochs 2): 8 steps" in (exp / "log.txt").read_text()
    for _ in range(2):  # nothing left to do: the run ends at once, and each resume keeps its own flags record
        train(data_dir, tmp_path, "epochs", "--resume-latest", **flags)
    assert sorted(p.name for p in exp.glob("args*.json")) == ["args-resume-0000008-2.json", "args-resume-0000008.json",
                                                              "args.json"]
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000003.pt", "0000006.pt", "0000008.pt"]


def test_sigint_ends_the_run_at_a_step_with_its_checkpoint(data_dir, tmp_path):
    args = tiny_repae_flags(data_dir, tmp_path, "stopped", **{"--max-train-steps": 10000,
                                                              "--checkpointing-steps": 10000})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train_repae.py"), *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_grid = tmp_path / "stopped" / "samples" / "0000001.png"  # written after step 1: the loop runs
    deadline = time.monotonic() + 300
    while not first_grid.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    log = (tmp_path / "stopped" / "log.txt").read_text()
    done = re.search(r"Done \(stopped by SIGINT; continue with --resume-latest\): (\d+) steps", log)
    assert done, log[-2000:]
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == [f"{int(done[1]):07d}.pt"]
