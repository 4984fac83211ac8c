"""Arguments (diffusers' names), bad-input errors that name the argument, and prior-preservation batches."""

from __future__ import annotations

import pytest
import torch
from arguments import DEFAULT_TARGETS, parse_args
from data import LatentSet, batch_at, check_prompts, list_images, load_image, make_batch, split_prior_loss
from dreambooth_fixtures import make_image_folder

DIFFUSERS_COMMAND = [
    "--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4", "--revision", "main", "--variant", "fp16",
    "--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog", "--class_data_dir", "class",
    "--class_prompt", "a photo of dog", "--with_prior_preservation", "--prior_loss_weight", "0.5",
    "--num_class_images", "50", "--resolution", "512", "--center_crop", "--random_flip", "--train_batch_size", "2",
    "--gradient_accumulation_steps", "2", "--max_train_steps", "800", "--learning_rate", "5e-5",
    "--lr_scheduler", "cosine", "--gradient_checkpointing", "--mixed_precision", "fp16",
    "--checkpointing_steps", "100",
    "--checkpoints_total_limit", "3", "--resume_from_checkpoint", "latest", "--validation_prompt", "a sks dog",
    "--num_validation_images", "2", "--report_to", "tensorboard", "--seed", "7", "--output_dir", "out",
]  # fmt: skip


def test_diffusers_argument_set_parses():
    args = parse_args([*DIFFUSERS_COMMAND, "--method", "tucker", "--rank", "4", "--tau", "0.2", "--r_max", "6"])
    assert (args.resolution, args.prior_loss_weight, args.mixed_precision, args.resume_from_checkpoint) == (
        512, 0.5, "fp16", "latest",
    )  # fmt: skip
    assert args.with_prior_preservation and args.gradient_checkpointing and args.random_flip
    assert (args.method, args.rank, args.tau, args.r_max) == ("tucker", 4, 0.2, 6)
    assert args.target_modules == DEFAULT_TARGETS
    defaults = parse_args(DIFFUSERS_COMMAND[:10] + ["--output_dir", "o"])
    assert defaults.lr_scheduler == "linear" and defaults.tau == 0.1  # decays to zero; Tucker's default tolerance
    attention_only = parse_args([*DIFFUSERS_COMMAND, "--target_modules", "to_q", "to_k", "to_v", "to_out.0"])
    assert attention_only.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert defaults.kohya_conv_format is None and not defaults.output_kohya_format
    kohya = parse_args([*DIFFUSERS_COMMAND, "--output_kohya_format"])
    assert kohya.kohya_conv_format == "tucker"  # a Tucker conv keeps its form (lora_mid) by default
    assert parse_args([*DIFFUSERS_COMMAND, "--method", "lora", "--output_kohya_format"]).kohya_conv_format == "flat"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "lora", "--tau", "0.1"], "`tau` is a Tucker setting"),
        (["--method", "lora", "--r_max", "8"], "`r_max` is a Tucker setting"),
        (["--method", "lora", "--absorb_core"], "`absorb_core` is a Tucker setting"),
        (["--tau", "1.5"], r"`tau` must be in \(0, 1\); got 1.5"),
        (["--rank", "0"], "`rank` must be >= 1; got 0"),
        (["--rank", "4", "--r_max", "2"], "`r_max` must be >= `rank`"),
        (["--checkpoints_total_limit", "0"], "`checkpoints_total_limit` must be >= 1"),
        (["--kohya_conv_format", "flat"], "`kohya_conv_format` needs `output_kohya_format`"),
        (["--method", "lora", "--output_kohya_format", "--kohya_conv_format", "tucker"], "'tucker' needs `--method"),
    ],
)
def test_bad_arguments_are_named(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args([*DIFFUSERS_COMMAND, *extra])


def test_prior_preservation_needs_a_class_folder():
    command = [a for a in DIFFUSERS_COMMAND if a not in ("--class_data_dir", "class")]
    with pytest.raises(ValueError, match="`class_data_dir` is required"):
        parse_args(command)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="`instance_data_dir` must be an existing folder"):
        list_images(str(tmp_path / "missing"), "instance_data_dir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="`instance_data_dir` holds no images"):
        list_images(str(tmp_path / "empty"), "instance_data_dir")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "00.jpg").write_bytes(b"not a jpeg")
    [path] = list_images(str(tmp_path / "broken"), "instance_data_dir")
    import random

    with pytest.raises(ValueError, match="`instance_data_dir`: cannot read image"):
        load_image(path, "instance_data_dir", 64, True, random.Random(0))


def test_training_rejects_a_missing_instance_folder(tiny_base, tmp_path):
    import train_dreambooth
    from dreambooth_fixtures import train_args

    with pytest.raises(ValueError, match="`instance_data_dir` must be an existing folder"):
        train_dreambooth.main(train_args(tiny_base, tmp_path / "nothing", tmp_path / "out", "--max_train_steps", "1"))


def test_prompt_needs_an_identifier():
    check_prompts("a photo of sks dog", "a photo of dog", True)
    with pytest.raises(ValueError, match="`instance_prompt` must contain an identifier absent from `class_prompt`"):
        check_prompts("a photo of dog", "a photo of dog", True)
    with pytest.raises(ValueError, match="`class_prompt` is required"):
        check_prompts("a photo of sks dog", None, True)


def test_crops_are_square_at_the_resolution(tmp_path):
    import random

    [path, *_] = list_images(str(make_image_folder(tmp_path / "imgs", 1, size=(90, 60))), "instance_data_dir")
    for center in (True, False):
        image = load_image(path, "instance_data_dir", 32, center, random.Random(0))
        assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1


def test_prior_preservation_batch_and_loss_split():
    instances = LatentSet([[torch.full((2, 1, 1), float(i))] for i in range(3)], "sks", [])
    classes = LatentSet([[torch.full((2, 1, 1), 10.0 + i)] for i in range(5)], "cls", [])
    latents, prompts = make_batch([1, 4], instances, classes, torch.Generator().manual_seed(0))
    # instances first (index modulo their count), then as many class examples
    assert latents[:, 0, 0, 0].tolist() == [1.0, 1.0, 11.0, 14.0]
    assert prompts == ["sks", "sks", "cls", "cls"]
    prediction, target = torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)
    total, instance, prior = split_prior_loss(prediction, target, True, 0.5)
    expected_instance = ((prediction[:2] - target[:2]) ** 2).mean()
    expected_prior = ((prediction[2:] - target[2:]) ** 2).mean()
    torch.testing.assert_close(instance, expected_instance)
    torch.testing.assert_close(prior, expected_prior)
    torch.testing.assert_close(total, expected_instance + 0.5 * expected_prior)
    total, instance, prior = split_prior_loss(prediction, target, False, 0.5)
    assert prior is None
    torch.testing.assert_close(total, ((prediction - target) ** 2).mean())


def test_batches_are_a_function_of_the_step():
    seen = [batch_at(step, 5, 2, seed=3) for step in range(3)]  # one epoch: 3 batches covering all 5 examples
    assert sorted(i for batch in seen for i in batch) == list(range(5))
    assert batch_at(1, 5, 2, seed=3) == seen[1]
    assert batch_at(3, 5, 2, seed=3) != batch_at(0, 5, 2, seed=3) or batch_at(4, 5, 2, seed=3) != seen[1]
