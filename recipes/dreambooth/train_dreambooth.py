"""DreamBooth fine-tuning of a diffusers UNet with rank-adaptive Tucker adapters (or PEFT LoRA, the baseline).

The loop follows diffusers' `examples/dreambooth/train_dreambooth_lora.py` (same argument names) with the Tucker
rank cycle around the optimizer step: backward, clipping, `updater.before_step()`, `optimizer.step()`,
`updater.after_step()`, once per optimizer step (`accelerator.sync_gradients`), and `updater.finalize()` at the end.

    accelerate launch recipes/dreambooth/train_dreambooth.py \
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --instance_data_dir dog \
        --instance_prompt "a photo of sks dog" --method tucker --tau 0.1 --output_dir out

Outputs in `--output_dir`: `tucker_adapter/` (PEFT format, reloadable with tucker_lora) or `lora_adapter/`,
`pytorch_lora_weights.safetensors` (diffusers format, loads with stock diffusers),
`pytorch_lora_weights_kohya.safetensors` (kohya format, with `--output_kohya_format`), `metrics.json`,
`validation/*.png`, `ranks.png` (Tucker), and `checkpoint-N/` folders.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arguments import parse_args  # noqa: E402
from checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint  # noqa: E402
from components import load_components  # noqa: E402
from data import (  # noqa: E402
    LatentSet,
    batch_at,
    check_prompts,
    encode_folder,
    list_images,
    make_batch,
    split_prior_loss,
)
from params import adapter_parameter_count, lora_parameter_count  # noqa: E402
from sampling import generate, save_grid, to_pil  # noqa: E402

logger = logging.getLogger("train_dreambooth")
HELDOUT_DRAWS = 32  # fixed (noise, timestep) draws per held-out image
HELDOUT_BATCH = 8


def add_adapter(unet, args) -> None:
    """Freeze the UNet and add the adapter chosen by `--method` on `--target_modules`."""
    unet.requires_grad_(False)
    if args.method == "tucker":
        import tucker_lora

        schedule = {k: getattr(args, k) for k in ("core_steps", "augment_start_step") if getattr(args, k) is not None}
        config = tucker_lora.TuckerAdapterConfig(
            r=args.rank, alpha=float(args.rank), tau=args.tau, r_max=args.r_max, target_modules=args.target_modules,
            absorb_core=args.absorb_core, **schedule,
        )  # fmt: skip
    else:
        from peft import LoraConfig

        config = LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=args.target_modules
        )
    unet.add_adapter(config)


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """Noise, timesteps and flips of micro-batch `micro_step`: a function of the step, so resuming is exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + micro_step) * 64 + process_index) % (2**63))


def denoising_loss(unet, noise_scheduler, latents, states, generator, weight_dtype):
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy.to(weight_dtype), timesteps, encoder_hidden_states=states.to(weight_dtype)).sample
    return prediction, target


@torch.no_grad()
def heldout_loss(unet, noise_scheduler, latent_set: LatentSet, text_encoder, seed: int, weight_dtype) -> float:
    """Mean denoising loss on `latent_set` over fixed seeded noise and timesteps (the same for every model)."""
    was_training = unet.training
    unet.eval()
    states = text_encoder([latent_set.prompt])
    losses = []
    for index, views in enumerate(latent_set.latents):
        generator = torch.Generator().manual_seed(seed * 7919 + index)
        for latents, hidden in heldout_batches(views[0], states):
            prediction, target = denoising_loss(unet, noise_scheduler, latents, hidden, generator, weight_dtype)
            losses.append(torch.nn.functional.mse_loss(prediction.float(), target.float()).item())
    unet.train(was_training)
    return sum(losses) / len(losses)


def heldout_batches(latent: torch.Tensor, states: torch.Tensor):
    """HELDOUT_DRAWS copies of one image's latent in batches of HELDOUT_BATCH (bounded memory on a full-size UNet)."""
    for _ in range(HELDOUT_DRAWS // HELDOUT_BATCH):
        yield latent[None].repeat(HELDOUT_BATCH, 1, 1, 1).to(states.device), states.repeat(HELDOUT_BATCH, 1, 1)


@torch.no_grad()
def class_drift(model, noise_scheduler, latent_set: LatentSet, text_encoder, seed: int, weight_dtype) -> float:
    """Mean squared difference between the adapted and the base UNet's predictions on the class images with the
    class prompt (fixed seeded noise and timesteps): how far the class drifted, what prior preservation limits."""
    was_training = model.training
    model.eval()
    states = text_encoder([latent_set.prompt])
    diffs = []
    for index, views in enumerate(latent_set.latents):
        generator = torch.Generator().manual_seed(seed * 7919 + index)
        for latents, hidden in heldout_batches(views[0], states):
            draw = generator.get_state()
            adapted, _ = denoising_loss(model, noise_scheduler, latents, hidden, generator, weight_dtype)
            model.disable_adapters()
            generator.set_state(draw)  # the base sees the same noise and timesteps
            base, _ = denoising_loss(model, noise_scheduler, latents, hidden, generator, weight_dtype)
            model.enable_adapters()
            diffs.append((adapted.float() - base.float()).pow(2).mean().item())
    model.train(was_training)
    return sum(diffs) / len(diffs)


def ensure_class_images(args, components, accelerator) -> list[str]:
    """Class images of `class_data_dir`, topped up to `num_class_images` by sampling the base model (as diffusers
    does), before any adapter is added."""
    os.makedirs(args.class_data_dir, exist_ok=True)
    existing = list_images(args.class_data_dir, "class_data_dir") if any(os.scandir(args.class_data_dir)) else []
    missing = args.num_class_images - len(existing)
    if missing > 0 and accelerator.is_main_process:
        logger.info("generating %d class images for %r into %s", missing, args.class_prompt, args.class_data_dir)
        for start in range(0, missing, 4):
            count = min(4, missing - start)
            images = generate(
                components.unet, components.text_encoder, components.vae, components.noise_scheduler.config,
                [args.class_prompt] * count, seed=args.seed + 10_000 + len(existing) + start,
                num_inference_steps=args.num_inference_steps,
            )  # fmt: skip
            for i, image in enumerate(images):
                save_grid(image[None], os.path.join(args.class_data_dir, f"class-{len(existing) + start + i:04d}.png"))
    accelerator.wait_for_everyone()
    return list_images(args.class_data_dir, "class_data_dir")[: args.num_class_images]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "peft", "accelerate", "transformers", "tucker-lora"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    start_time = time.time()
    check_prompts(args.instance_prompt, args.class_prompt, args.with_prior_preservation)
    instance_files = list_images(args.instance_data_dir, "instance_data_dir")
    heldout_files = []
    if args.heldout_image is not None:
        heldout_files = [f for f in instance_files if os.path.basename(f) == args.heldout_image]
        if not heldout_files:
            raise ValueError(f"`heldout_image` must name a file in instance_data_dir; got {args.heldout_image!r}.")
        instance_files = [f for f in instance_files if f not in heldout_files]
        if not instance_files:
            raise ValueError(f"`heldout_image` {args.heldout_image!r} is the only instance image; none left to train.")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    if accelerator.mixed_precision != "no" and not accelerator.native_amp:
        # accelerate has no fp16 autocast on CPU: the bf16/fp16 base would meet float32 adapters and fail mid-forward
        raise ValueError(
            f"`mixed_precision` {args.mixed_precision!r} needs autocast, which accelerate does not provide on "
            f"{accelerator.device.type!r}; use 'bf16' on a CPU (or 'no'). Got {args.mixed_precision!r}."
        )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)  # adapter initialization

    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant)
    unet, text_encoder, vae, noise_scheduler = (
        components.unet, components.text_encoder, components.vae, components.noise_scheduler,
    )  # fmt: skip
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (unet, text_encoder, vae):
        module.to(accelerator.device)
    scale = 2 ** (len(unet.config.block_out_channels) - 1) if vae.kind == "kl" else 8
    resolution = args.resolution or unet.config.sample_size * scale

    class_files = ensure_class_images(args, components, accelerator) if args.with_prior_preservation else []
    seed = args.seed
    encode = lambda files, name, prompt: encode_folder(  # noqa: E731
        files, name, prompt, vae, resolution, args.center_crop, args.random_flip, seed
    )
    instances = encode(instance_files, "instance_data_dir", args.instance_prompt)
    classes = encode(class_files, "class_data_dir", args.class_prompt) if class_files else None
    heldout = encode(heldout_files, "heldout_image", args.instance_prompt) if heldout_files else None
    # the text encoder is frozen: encode the (at most two) prompts once
    used_prompts = [args.instance_prompt] + ([args.class_prompt] if classes else [])
    prompt_states = dict(zip(used_prompts, text_encoder(used_prompts)))

    if weight_dtype != torch.float32:
        unet.to(dtype=weight_dtype)  # the frozen base only: the adapter is added (in float32) below
    heldout_base = None
    if heldout:
        heldout_base = heldout_loss(unet, noise_scheduler, heldout, text_encoder, args.heldout_seed, weight_dtype)
    add_adapter(unet, args)
    cast_training_params(unet, dtype=torch.float32)  # adapter parameters train in float32 under mixed precision
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(unet)
    global_step, history = 0, []
    if args.resume_from_checkpoint:
        folder = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if folder is None:
            logger.warning("no checkpoint in %s to resume from: starting a new run", args.output_dir)
        else:
            state = load_checkpoint(folder, model, optimizer, lr_scheduler)
            global_step, history = state["global_step"], state["history"]
            logger.info("resumed from %s at step %d", folder, global_step)
    updater = None
    if args.method == "tucker":
        import tucker_lora

        # built after the checkpoint load, so that the ranks it reports start from the loaded ones
        updater = tucker_lora.TuckerRankUpdater(unet, optimizer, total_steps=args.max_train_steps)
        updater.step = global_step  # the schedule is a function of the step count
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("dreambooth-tucker", config={k: str(v) for k, v in vars(args).items()})

    num_examples = max(len(instances), len(classes) if classes else 0)
    per_process = max(1, args.train_batch_size)
    unet.train()
    running, running_instance, running_count = 0.0, 0.0, 0
    while global_step < args.max_train_steps:
        for micro in range(args.gradient_accumulation_steps):
            micro_step = global_step * args.gradient_accumulation_steps + micro
            generator = step_generator(seed, micro_step, accelerator.process_index)
            indices = batch_at(
                micro_step * accelerator.num_processes + accelerator.process_index, num_examples, per_process, seed
            )
            latents, prompts = make_batch(indices, instances, classes, generator)
            states = torch.stack([prompt_states[p] for p in prompts])
            with accelerator.accumulate(unet):
                prediction, target = denoising_loss(
                    unet, noise_scheduler, latents.to(accelerator.device), states, generator, weight_dtype
                )
                loss, instance_loss, _ = split_prior_loss(prediction, target, bool(classes), args.prior_loss_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for p in params if p.grad is not None], args.max_grad_norm)
                    if updater is not None:
                        updater.before_step()
                    optimizer.step()
                    if updater is not None:
                        updater.after_step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            running += loss.detach().item()
            running_instance += instance_loss.detach().item()
            running_count += 1
        global_step += 1
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            entry = {
                "step": global_step,
                "loss": running / running_count,
                "instance_loss": running_instance / running_count,  # the loss without the prior term
                "lr": lr_scheduler.get_last_lr()[0],
            }
            if updater is not None:
                entry.update(updater.metrics())  # tucker_rank/<module>/<mode> and tucker_active_params
            history.append(entry)
            accelerator.log(entry, step=global_step)
            logger.info("step %d/%d loss %.4f", global_step, args.max_train_steps, entry["loss"])
            running, running_instance, running_count = 0.0, 0.0, 0
        if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
            save_checkpoint(
                args.output_dir, global_step, model, optimizer, lr_scheduler,
                {"global_step": global_step, "history": history, "method": args.method}, args.checkpoints_total_limit,
            )  # fmt: skip
        # the last step's validation comes after `finalize`, in save_outputs
        mid_run = global_step < args.max_train_steps
        if args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0 and mid_run:
            run_validation(args, model, text_encoder, vae, noise_scheduler, global_step, accelerator)

    if updater is not None:
        updater.finalize()
    accelerator.wait_for_everyone()
    metrics = {}
    if accelerator.is_main_process:
        metrics = save_outputs(args, model, text_encoder, vae, noise_scheduler, history, heldout, heldout_base,
                               classes, weight_dtype, accelerator, start_time)  # fmt: skip
    accelerator.end_training()
    return metrics


def run_validation(args, model, text_encoder, vae, noise_scheduler, step: int, accelerator):
    """`(grid path, images)` of `--num_validation_images` samples of `--validation_prompt`; `(None, None)` off the
    main process."""
    if not accelerator.is_main_process:
        return None, None
    images = generate(
        model, text_encoder, vae, noise_scheduler.config, [args.validation_prompt] * args.num_validation_images,
        seed=args.seed, num_inference_steps=args.num_inference_steps,
    )  # fmt: skip
    return save_grid(images, os.path.join(args.output_dir, "validation", f"step-{step:06d}.png")), images


def score_images(args, images, device) -> dict | None:
    """CLIP-I / CLIP-T / DINO of the final validation images against every photo in `instance_data_dir`, when
    `--clip_model_name_or_path` or `--dino_model_name_or_path` is given (the models load only then)."""
    if images is None or not (args.clip_model_name_or_path or args.dino_model_name_or_path):
        return None
    from image_metrics import image_metrics, subject_prompt
    from PIL import Image

    real = []
    for path in list_images(args.instance_data_dir, "instance_data_dir"):
        with Image.open(path) as image:
            real.append(image.convert("RGB"))
    prompt = subject_prompt(args.validation_prompt, args.instance_prompt, args.class_prompt)
    return image_metrics(
        to_pil(images), real, prompt, args.clip_model_name_or_path, args.dino_model_name_or_path, device
    )


def save_outputs(args, model, text_encoder, vae, noise_scheduler, history, heldout, heldout_base, classes,
                 weight_dtype, accelerator, start_time) -> dict:  # fmt: skip
    from export_diffusers import save_adapter, save_diffusers_lora, save_kohya_lora

    adapter_dir = save_adapter(model, args.output_dir, args.method)
    weights = save_diffusers_lora(model, args.output_dir, args.method)
    kohya = (
        save_kohya_lora(model, args.output_dir, args.method, args.kohya_conv_format)
        if args.output_kohya_format
        else None
    )
    validation, images = (
        run_validation(args, model, text_encoder, vae, noise_scheduler, args.max_train_steps, accelerator)
        if args.validation_prompt
        else (None, None)
    )
    metrics = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "method": args.method,
        "rank": args.rank,
        "tau": args.tau,
        "r_max": args.r_max,
        "absorb_core": args.absorb_core,
        "target_modules": args.target_modules,
        "instance_data_dir": args.instance_data_dir,
        "instance_prompt": args.instance_prompt,
        "max_train_steps": args.max_train_steps,
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "heldout_image": args.heldout_image,
        "heldout_loss": heldout_loss(model, noise_scheduler, heldout, text_encoder, args.heldout_seed, weight_dtype)
        if heldout
        else None,
        "heldout_loss_base": heldout_base,
        "heldout_seed": args.heldout_seed,
        "class_drift": class_drift(model, noise_scheduler, classes, text_encoder, args.heldout_seed, weight_dtype)
        if classes
        else None,
        "image_metrics": score_images(args, images, accelerator.device),  # CLIP-I, CLIP-T, DINO
        "active_trainable_params": adapter_parameter_count(model, args.method),
        "lora_r4_params_same_layers": lora_parameter_count(model, 4),
        "final_ranks": None,
        "wall_time_s": round(time.time() - start_time, 1),
        "versions": versions(),
        "outputs": {"adapter": adapter_dir, "diffusers_lora": weights, "kohya_lora": kohya, "validation": validation},
    }
    if args.method == "tucker":
        import tucker_lora

        metrics["final_ranks"] = tucker_lora.get_ranks(model)
        if history:
            path = os.path.join(args.output_dir, "ranks.png")
            metrics["outputs"]["rank_plot"] = str(tucker_lora.plot_ranks(history, path))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
