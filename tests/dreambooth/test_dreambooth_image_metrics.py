"""CLIP-I, CLIP-T and DINO (DreamBooth's image metrics) with tiny random CLIP / ViT models saved to a temporary
folder (never the hub): the maths against the models' own outputs, the flags, and metrics.json after a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from arguments import DEFAULT_CLIP, DEFAULT_DINO, build_parser, parse_args
from dreambooth_fixtures import train_args
from image_metrics import image_metrics, subject_prompt
from PIL import Image

from tests.tolerances import assert_close


def _images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


def test_clip_scores_match_the_clip_models_own_similarities(tiny_clip):
    from transformers import AutoProcessor, CLIPModel

    generated, real, prompt = _images(2, 0), _images(3, 1), "a photo of dog"
    scores = image_metrics(generated, real, prompt, clip_model_name_or_path=str(tiny_clip))
    # CLIPModel's forward: logits_per_image = exp(logit_scale) * cos(image, text), its own embedding path
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        inputs = processor(text=[prompt], images=generated, return_tensors="pt", padding=True)
        out = model(**inputs)
        clip_t = (out.logits_per_image / model.logit_scale.exp()).mean()
        real_embeds = model(**processor(text=[prompt], images=real, return_tensors="pt", padding=True)).image_embeds
    clip_i = torch.stack([torch.cosine_similarity(g, r, dim=0) for g in out.image_embeds for r in real_embeds]).mean()
    assert_close(torch.tensor(scores["clip_t"]), clip_t)
    assert_close(torch.tensor(scores["clip_i"]), clip_i)
    assert scores["dino"] is None and scores["num_generated"] == 2 and scores["num_real"] == 3


def test_dino_is_the_mean_cls_cosine_over_pairs(tiny_dino):
    from transformers import AutoImageProcessor, AutoModel

    generated, real = _images(2, 0), _images(2, 1)
    scores = image_metrics(generated, real, "a photo of dog", dino_model_name_or_path=str(tiny_dino))
    assert scores["clip_i"] is None and scores["clip_t"] is None
    model, processor = AutoModel.from_pretrained(tiny_dino).eval(), AutoImageProcessor.from_pretrained(tiny_dino)
    with torch.no_grad():
        cls = [model(**processor(images=[im], return_tensors="pt")).last_hidden_state[0, 0] for im in generated + real]
    pairs = [torch.cosine_similarity(cls[g], cls[2 + r], dim=0) for g in range(2) for r in range(2)]
    assert_close(torch.tensor(scores["dino"]), torch.stack(pairs).mean())


def test_an_image_against_itself_scores_one(tiny_clip, tiny_dino):
    [image] = _images(1, 3)
    scores = image_metrics([image], [image], "a dog", str(tiny_clip), str(tiny_dino))
    assert abs(scores["clip_i"] - 1) < 1e-5 and abs(scores["dino"] - 1) < 1e-5
    assert -1 <= scores["clip_t"] <= 1


def test_subject_prompt_drops_the_identifier():
    assert subject_prompt("a sks dog in the snow", "a photo of sks dog", "a photo of dog") == "a dog in the snow"
    assert subject_prompt("a sks dog", "a photo of sks dog", None) == "a sks dog"


def test_flags_help_errors():
    help_text = "".join(build_parser().format_help().split())  # argparse wraps lines, at hyphens too
    assert DEFAULT_CLIP in help_text and DEFAULT_DINO in help_text
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a sks dog",
            "--output_dir", "o"]  # fmt: skip
    args = parse_args(base)
    assert args.clip_model_name_or_path is None and args.dino_model_name_or_path is None  # nothing loads by default
    with pytest.raises(ValueError, match="`clip_model_name_or_path` scores the validation images"):
        parse_args([*base, "--clip_model_name_or_path", "clip"])
    with pytest.raises(ValueError, match="`dino_model_name_or_path`: cannot load"):
        image_metrics(_images(1, 0), _images(1, 1), "a dog", dino_model_name_or_path="/nonexistent/dino")


def test_training_writes_the_image_metrics(tiny_base, instance_dir, tiny_clip, tiny_dino, tmp_path):
    import train_dreambooth

    extra = [
        "--max_train_steps", "2", "--validation_prompt", "a photo of sks dog", "--num_validation_images", "2",
        "--num_inference_steps", "2", "--clip_model_name_or_path", str(tiny_clip),
        "--dino_model_name_or_path", str(tiny_dino),
    ]  # fmt: skip
    train_dreambooth.main(train_args(tiny_base, instance_dir, tmp_path / "out", *extra))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["image_metrics"]
    assert saved["num_generated"] == 2 and saved["num_real"] == 3  # the validation images, every instance photo
    assert saved["clip_model"] == str(tiny_clip) and saved["dino_model"] == str(tiny_dino)
    for name in ("clip_i", "clip_t", "dino"):
        assert -1 <= saved[name] <= 1, name
