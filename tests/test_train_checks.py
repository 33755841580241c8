"""The trainers check their inputs before building anything and refuse bad ones in one line, writing nothing."""
from pathlib import Path

import pytest

import train_ldm_only
import train_repae
from helpers import assert_user_error, run_script, tiny_repae_flags, tiny_training_flags

pytestmark = pytest.mark.slow  # each start reads the session's tiny dataset, which preprocessing.py makes first


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    """The session's 16-image, 2-class dataset at 32 px."""
    return tiny_data


def refused(script, data_dir, out, *extra, **overrides):
    """Start a trainer that must refuse; returns the CompletedProcess after checking nothing was written."""
    flags = tiny_repae_flags if script == "train_repae.py" else tiny_training_flags
    args = flags(data_dir, out, "refused", **overrides) + list(extra)
    result = run_script(script, *args, check=False)
    assert not (out / "refused").exists(), "a refused start must leave no experiment folder"
    return result


@pytest.mark.parametrize("script", ["train_repae.py", "train_ldm_only.py"])
def test_missing_data_folder(script, tmp_path):
    missing = tmp_path / "no-such-data"
    result = refused(script, missing, tmp_path, **({"--vae-ckpt": "none"} if script == "train_repae.py" else {}))
    assert_user_error(result, str(missing), "preprocessing.py")


def test_resolution_that_does_not_match_the_images(data_dir, tmp_path):
    result = refused("train_repae.py", data_dir, tmp_path, **{"--resolution": 64})
    assert_user_error(result, "--resolution 64", "32x32", "--resolution 32")


def test_batch_size_larger_than_the_dataset(data_dir, tmp_path):
    result = refused("train_repae.py", data_dir, tmp_path, **{"--batch-size": 32})
    assert_user_error(result, "--batch-size 32", "16 images")


def test_unreadable_loss_config(data_dir, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("losses: [unclosed\n")
    result = refused("train_repae.py", data_dir, tmp_path, **{"--loss-cfg-path": config})
    assert_user_error(result, "--loss-cfg-path", str(config))


def test_unknown_model_and_bad_flags(data_dir, tmp_path):
    assert_user_error(refused("train_repae.py", data_dir, tmp_path, **{"--model": "SiT-Q/2"}), "--model SiT-Q/2")
    result = refused("train_repae.py", data_dir, tmp_path, **{"--sampling-steps": 0})  # refused where parsed
    assert result.returncode == 2 and "error: argument --sampling-steps: 0 is not a positive integer" in result.stderr


def test_text_file_given_as_vae_checkpoint(data_dir, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    result = refused("train_repae.py", data_dir, tmp_path, **{"--vae-ckpt": text})
    assert_user_error(result, str(text))


@pytest.mark.parametrize("trainer", [train_repae, train_ldm_only])
def test_help_answers_without_torch_and_explains_every_flag(trainer):
    result = run_script(Path(trainer.__file__).name, "--help", env={"PYTHONPROFILEIMPORTTIME": "1"}, subprocess=True)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "accelerate" not in imported
    assert "--exp-name" in result.stdout and "(default: 0.0001)" in result.stdout
    assert all(action.help for action in trainer.build_parser()._actions)
