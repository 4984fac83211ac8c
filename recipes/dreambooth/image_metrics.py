"""DreamBooth's image metrics (Ruiz et al., 2023) of generated images against the subject's photos.

- CLIP-I: mean cosine similarity between the CLIP image embeddings of every (generated, real) pair;
- CLIP-T: mean cosine similarity between the CLIP embedding of the prompt and those of the generated images;
- DINO: mean cosine similarity between the DINO ViT embeddings (the CLS token) of every (generated, real) pair.

The models load with transformers (`CLIPModel` + `AutoProcessor`, `AutoModel` + `AutoImageProcessor`) from a
folder or hub id, only when asked for.
"""

from __future__ import annotations

import torch
from PIL import Image


def _load(name: str, path: str, loader):
    try:
        return loader(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"`{name}`: cannot load {path!r} with transformers ({error})") from error


def _unit(features) -> torch.Tensor:
    # transformers 5 returns a model output whose `pooler_output` is the projected embedding; 4.x a tensor
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair `(a[i], b[j])` of unit vectors."""
    return (a @ b.T).mean().item()


@torch.no_grad()
def clip_scores(path: str, generated: list[Image.Image], real: list[Image.Image], prompt: str, device="cpu") -> dict:
    """`{"clip_i": ..., "clip_t": ...}` with the CLIP model at `path`."""
    from transformers import AutoProcessor, CLIPModel

    model = _load("clip_model_name_or_path", path, CLIPModel.from_pretrained).to(device).eval()
    processor = _load("clip_model_name_or_path", path, AutoProcessor.from_pretrained)

    def images(batch: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        return _unit(model.get_image_features(pixel_values=pixels))

    text = processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
    text_embedding = _unit(model.get_text_features(**{k: v.to(device) for k, v in text.items()}))
    generated_embeddings = images(generated)
    return {
        "clip_i": mean_cosine(generated_embeddings, images(real)),
        "clip_t": mean_cosine(generated_embeddings, text_embedding),
    }


@torch.no_grad()
def dino_score(path: str, generated: list[Image.Image], real: list[Image.Image], device="cpu") -> float:
    """DINO with the ViT at `path` (its CLS token, as in the DreamBooth paper)."""
    from transformers import AutoImageProcessor, AutoModel

    model = _load("dino_model_name_or_path", path, AutoModel.from_pretrained).to(device).eval()
    processor = _load("dino_model_name_or_path", path, AutoImageProcessor.from_pretrained)

    def embed(batch: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        return _unit(model(pixel_values=pixels).last_hidden_state[:, 0])

    return mean_cosine(embed(generated), embed(real))


def subject_prompt(prompt: str, instance_prompt: str, class_prompt: str | None) -> str:
    """The prompt for CLIP-T: `prompt` without the identifier (the words of the instance prompt that the class
    prompt lacks, e.g. "sks"), which means nothing to CLIP; as written when there is no class prompt."""
    if not class_prompt:
        return prompt
    identifier = set(instance_prompt.split()) - set(class_prompt.split())
    return " ".join(word for word in prompt.split() if word not in identifier)


def image_metrics(
    generated: list[Image.Image],
    real: list[Image.Image],
    prompt: str,
    clip_model_name_or_path: str | None = None,
    dino_model_name_or_path: str | None = None,
    device="cpu",
) -> dict:
    """CLIP-I, CLIP-T (with a CLIP model) and DINO (with a DINO ViT) of `generated` against `real`; a metric whose
    model is not given is None."""
    if not generated or not real:
        raise ValueError(f"image metrics need generated and real images; got {len(generated)} and {len(real)}.")
    result = {
        "clip_i": None, "clip_t": None, "dino": None, "clip_t_prompt": prompt,
        "clip_model": clip_model_name_or_path, "dino_model": dino_model_name_or_path,
        "num_generated": len(generated), "num_real": len(real),
    }  # fmt: skip
    if clip_model_name_or_path:
        result.update(clip_scores(clip_model_name_or_path, generated, real, prompt, device))
    if dino_model_name_or_path:
        result["dino"] = dino_score(dino_model_name_or_path, generated, real, device)
    return result
