"""Ways a run starts or ends wrong, checked in this process: flag ranges at parse time, the data's classes, the
tracker's login, who owns an experiment folder, a VAE that cannot decode."""
import json

import numpy as np
import pytest
import torch

import generate
import train_ldm_only
import train_repae
from training.flags import check_training_args
from training.setup import check_dataset, find_resume_checkpoint
from training.tracking import check_trackers
from utils.errors import UserError
from weights.training_checkpoint import load_autoencoder

REQUIRED = ["--exp-name", "x"]


@pytest.mark.parametrize("flag, value, message", [
    ("--ema-decay", "2", "--ema-decay: 2 is not a number in [0, 1]"),
    ("--learning-rate", "-1", "--learning-rate: -1 is not a positive number (> 0)"),
    ("--vae-learning-rate", "-1", "--vae-learning-rate: -1 is not a positive number (> 0)"),
    ("--adam-beta1", "1.5", "--adam-beta1: 1.5 is not a number in [0, 1)"),
    ("--num-workers", "-1", "--num-workers: -1 is not a non-negative integer (>= 0)"),
    ("--keep-last-checkpoints", "-1", "--keep-last-checkpoints: -1 is not a non-negative integer (>= 0)"),
    ("--sampling-steps", "0", "--sampling-steps: 0 is not a positive integer (>= 1)"),
])
def test_trainer_flags_out_of_range_are_refused_where_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train_repae.parse_args(REQUIRED + [flag, value])
    assert message in capsys.readouterr().err


def test_ranges_are_in_the_help():
    help_text = " ".join(train_ldm_only.build_parser().format_help().split())
    assert "EMA decay of the SiT (short runs: 0.99) (default: 0.9999) [number in [0, 1]]" in help_text
    assert "[non-negative integer (>= 0)]" in help_text


def test_guidance_interval_must_not_be_empty(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--guidance-low", "0.8", "--guidance-high", "0.2"])
    assert "--guidance-low 0.8 is above --guidance-high 0.2" in capsys.readouterr().err


def test_encoder_depth_beyond_the_model_is_refused():
    args = train_repae.parse_args(REQUIRED + ["--model", "SiT-T/2", "--vae", "f8d4-tiny", "--vae-ckpt", "none",
                                              "--resolution", "32", "--encoder-depth", "99"])
    with pytest.raises(UserError, match="--encoder-depth 99: SiT-T/2 has 4 blocks; pass 1 to 4"):
        check_training_args(args)


def test_evaluation_during_training_needs_a_reference():
    args = train_ldm_only.build_parser().parse_args(REQUIRED + ["--model", "SiT-T/2", "--vae", "f8d4-tiny",
                                                                "--vae-ckpt", "none", "--resolution", "32",
                                                                "--encoder-depth", "2", "--eval-every", "5"])
    with pytest.raises(UserError, match=r"^--eval-every 5 needs --eval-ref: the statistics file reference_stats.py"):
        check_training_args(args)
    args.eval_ref = "ref.npz"
    check_training_args(args)


class FakeDataset(list):
    """A list of labels with the attributes check_dataset reads."""
    image_size, data_dir = (32, 32), "data"

    @property
    def labels(self):
        return np.array(self)


def test_data_with_more_classes_than_num_classes_is_refused():
    data = FakeDataset([0, 1, 2, 0])
    with pytest.raises(UserError, match=r"--num-classes 2 is fewer than the 3 classes \(labels 0..2\)"):
        check_dataset(data, resolution=32, global_batch_size=2, num_processes=1, num_classes=2)
    check_dataset(data, resolution=32, global_batch_size=2, num_processes=1, num_classes=3)


def test_a_batch_the_processes_cannot_share_is_refused():
    with pytest.raises(UserError, match=r"^--batch-size 5 is not divisible by the 2 processes: pass a multiple of 2$"):
        check_dataset(FakeDataset([0, 1] * 4), resolution=32, global_batch_size=5, num_processes=2, num_classes=2)


def test_wandb_without_login_is_refused_before_anything(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UserError, match="--report-to wandb: this machine has no wandb login: run `wandb login`.*"
                                        "WANDB_MODE=offline.*--report-to tensorboard"):
        check_trackers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(["wandb"])
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    (tmp_path / ".netrc").chmod(0o600)
    check_trackers(["wandb", "tensorboard"])


def write_experiment(folder, config):
    """An experiment folder with args.json and one checkpoint file."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(config))
    torch.save({"steps": 1}, folder / "checkpoints" / "0000001.pt")
    return folder


@pytest.mark.parametrize("config", [{"trainer": "train_repae.py"}, {"loss_cfg_path": "configs/x.yaml"}])
def test_an_experiment_folder_belongs_to_the_trainer_that_made_it(config, tmp_path):
    exp = write_experiment(tmp_path / "r1", config)
    with pytest.raises(UserError, match=f"--exp-name: {exp} is an experiment of train_repae.py, not of "
                                        "train_ldm_only.py"):
        find_resume_checkpoint(exp, trainer="train_ldm_only.py", resume_step=0, continue_train_exp_dir=None,
                               resume_latest=True)
    assert find_resume_checkpoint(exp, trainer="train_repae.py", resume_step=0, continue_train_exp_dir=None,
                                  resume_latest=True) == exp / "checkpoints" / "0000001.pt"


def test_trainers_record_themselves():
    assert train_repae.parse_args(REQUIRED).trainer == "train_repae.py"
    assert train_ldm_only.build_parser().parse_args(REQUIRED).trainer == "train_ldm_only.py"


def test_latent_diffusion_checkpoint_with_no_vae_to_decode_is_refused():
    config = {"vae": "f8d4-tiny", "vae_ckpt": "none"}
    with pytest.raises(UserError, match=r"ckpt.pt holds no VAE and the training args name none \(vae_ckpt: none\)"):
        load_autoencoder(config, {"ema": {}}, "ckpt.pt", None, "cpu")


@pytest.mark.slow
def test_a_vae_folder_of_another_layout_names_the_way_out_of_each_script(tmp_path):
    from models.autoencoder import vae_models
    from weights.diffusers_format import export_diffusers_vae
    from weights.vae import load_vae

    folder = export_diffusers_vae(vae_models["f16d32-tiny"](), "f16d32-tiny", tmp_path / "f16")
    with pytest.raises(UserError, match="holds a f16d32-tiny VAE, but --vae-arch is f8d4-tiny: pass --vae-arch "
                                        "f16d32-tiny"):
        load_vae("f8d4-tiny", str(folder), arch_flag="--vae-arch", ckpt_flag="--vae-ckpt-path")
    with pytest.raises(UserError, match="holds a f16d32-tiny VAE, but the run trained with --vae f8d4-tiny: pass a "
                                        "VAE of that layout"):
        load_autoencoder({"vae": "f8d4-tiny", "vae_ckpt": str(folder)}, {"ema": {}}, "ckpt.pt", None, "cpu")
    torch.save(vae_models["f16d32-tiny"]().state_dict(), tmp_path / "f16.pt")
    with pytest.raises(UserError, match="does not fit AutoencoderKL: check --vae-arch f8d4-tiny against the "
                                        "checkpoint"):
        load_vae("f8d4-tiny", str(tmp_path / "f16.pt"), arch_flag="--vae-arch", ckpt_flag="--vae-ckpt-path")
