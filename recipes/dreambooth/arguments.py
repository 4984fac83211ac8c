"""Command-line arguments: diffusers' `examples/dreambooth/train_dreambooth_lora.py` names, plus the adapter choice."""

from __future__ import annotations

import argparse

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # hub ids named in the help; nothing loads unless a flag is given
DEFAULT_DINO = "facebook/dino-vits16"  # the DreamBooth paper's DINO ViT-S/16
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DreamBooth fine-tuning of a diffusers UNet with Tucker or LoRA adapters.")
    a = p.add_argument
    a("--pretrained_model_name_or_path", required=True, help="Stable Diffusion folder / hub id, or an offline base")
    a("--revision", default=None)
    a("--variant", default=None)
    a("--instance_data_dir", required=True)
    a("--instance_prompt", required=True, help="e.g. 'a photo of sks dog'")
    a("--class_data_dir", default=None)
    a("--class_prompt", default=None)
    a("--with_prior_preservation", action="store_true")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--num_class_images", type=int, default=100)
    a("--resolution", type=int, default=None, help="default: the base model's (UNet sample size x autoencoder scale)")
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--train_batch_size", type=int, default=1)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=400)
    a("--learning_rate", type=float, default=1e-4)
    a("--lr_scheduler", default="linear", choices=LR_SCHEDULERS, help="default decays linearly to zero")
    a("--lr_warmup_steps", type=int, default=0)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--max_grad_norm", type=float, default=1.0)
    a("--gradient_checkpointing", action="store_true")
    a("--mixed_precision", default="no", choices=MIXED_PRECISION)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in output_dir")
    a("--validation_prompt", default=None)
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, default=None, help="also validate every N steps (default: at the end only)")
    a("--num_inference_steps", type=int, default=25)
    a("--report_to", default="none", help="accelerate trackers: tensorboard, wandb, ... or none")
    a("--logging_steps", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--output_dir", required=True)
    a(
        "--heldout_image",
        default=None,
        help="file name in instance_data_dir kept out of training for the held-out loss",
    )
    a(
        "--heldout_seed",
        type=int,
        default=0,
        help="seed of the held-out loss's and class drift's noise and timesteps, apart from --seed so that runs of "
        "every training seed are scored on the same draws",
    )
    # DreamBooth's image metrics of the final validation images against the instance photos (nothing loads without)
    a(
        "--clip_model_name_or_path",
        default=None,
        help=f"CLIP model (folder or hub id, e.g. {DEFAULT_CLIP}) for CLIP-I and CLIP-T in metrics.json",
    )
    a(
        "--dino_model_name_or_path",
        default=None,
        help=f"DINO ViT (folder or hub id, e.g. {DEFAULT_DINO}, the paper's ViT-S/16) for DINO in metrics.json",
    )
    # the adapter
    a("--method", default="tucker", choices=("tucker", "lora"))
    a("--rank", type=int, default=4, help="Tucker: initial rank; LoRA: rank (alpha = rank)")
    a("--tau", type=float, default=None, help="Tucker truncation tolerance in (0, 1); default 0.1")
    a("--r_max", type=int, default=None, help="Tucker: largest rank per mode; default 2 * rank")
    a("--core_steps", type=int, default=None, help="Tucker: steps between augmentation and truncation (default 10)")
    a("--augment_start_step", type=int, default=None, help="Tucker: steps before the first augmentation (default 10)")
    a(
        "--absorb_core",
        action="store_true",
        help="Tucker: step the linear adapters (attention) as K = U C and V, as LoRA steps B and A; convs keep the "
        "Tucker form (docs/training.md)",
    )
    a("--target_modules", nargs="+", default=DEFAULT_TARGETS, help="attention only: to_q to_k to_v to_out.0")
    a(
        "--output_kohya_format",
        action="store_true",
        help="also write pytorch_lora_weights_kohya.safetensors (kohya / sd-scripts keys: AUTOMATIC1111, ComfyUI)",
    )
    a(
        "--kohya_conv_format",
        default=None,
        choices=("tucker", "flat"),
        help="Tucker kxk convs in the kohya file: 'tucker' (default; lora_down 1x1 / lora_mid kxk / lora_up 1x1, "
        "LyCORIS' layout) or 'flat' (kxk lora_down, what diffusers' kohya loader reads)",
    )
    return p


def _positive(args: argparse.Namespace, name: str, minimum: float = 1) -> None:
    value = getattr(args, name)
    if value is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; bad values raise `ValueError` naming the argument."""
    args = build_parser().parse_args(argv)
    if args.method == "lora" and args.tau is not None:
        raise ValueError(f"`tau` is a Tucker setting; `--method lora` has fixed rank `--rank`. Got tau={args.tau}.")
    for name in ("r_max", "core_steps", "augment_start_step"):
        if args.method == "lora" and getattr(args, name) is not None:
            raise ValueError(
                f"`{name}` is a Tucker setting and `--method lora` has none; got {name}={getattr(args, name)}."
            )
    if args.method == "lora" and args.absorb_core:
        raise ValueError("`absorb_core` is a Tucker setting and `--method lora` has none; got absorb_core=True.")
    if args.method == "tucker" and args.tau is None:
        args.tau = 0.1
    if args.tau is not None and not 0.0 < args.tau < 1.0:
        raise ValueError(f"`tau` must be in (0, 1); got {args.tau}.")
    for name in ("rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "checkpoints_total_limit", "num_validation_images", "num_inference_steps", "logging_steps",
                 "validation_steps", "resolution", "num_class_images", "core_steps"):  # fmt: skip
        _positive(args, name)
    if args.r_max is not None and args.r_max < args.rank:
        raise ValueError(f"`r_max` must be >= `rank` ({args.rank}); got {args.r_max}.")
    if args.learning_rate <= 0:
        raise ValueError(f"`learning_rate` must be > 0; got {args.learning_rate}.")
    if args.prior_loss_weight < 0:
        raise ValueError(f"`prior_loss_weight` must be >= 0; got {args.prior_loss_weight}.")
    if args.with_prior_preservation and not args.class_data_dir:
        raise ValueError("`class_data_dir` is required with `with_prior_preservation` (class images are read from it "
                         "and generated into it when fewer than `num_class_images`); got None.")  # fmt: skip
    for name in ("clip_model_name_or_path", "dino_model_name_or_path"):
        value = getattr(args, name)
        if value and not args.validation_prompt:
            raise ValueError(
                f"`{name}` scores the validation images and needs `validation_prompt`; got {name}={value!r} and no "
                "validation_prompt."
            )
    if args.kohya_conv_format is not None and not args.output_kohya_format:
        raise ValueError(
            f"`kohya_conv_format` needs `output_kohya_format`; got kohya_conv_format={args.kohya_conv_format!r}."
        )
    if args.method == "lora" and args.kohya_conv_format == "tucker":
        raise ValueError("`kohya_conv_format` 'tucker' needs `--method tucker` (LoRA convs are flat); got 'tucker'.")
    if args.output_kohya_format and args.kohya_conv_format is None:
        args.kohya_conv_format = "tucker" if args.method == "tucker" else "flat"
    return args
