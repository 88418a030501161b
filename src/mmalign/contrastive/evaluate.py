"""Zero-shot classification from text prompts and cross-modal retrieval Recall@K."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPLATES = ["a photo of {}.", "a picture of {}.", "an image showing {}.", "{}."]


def class_embeddings(embed_texts, class_names: list[str], templates: list[str] = TEMPLATES) -> torch.Tensor:
    """(classes, E): per class, the re-normalised mean of its prompt embeddings (CLIP's prompt ensembling)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = embed_texts(prompts).view(len(class_names), len(templates), -1)  # (C, templates, E)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot_accuracy(media_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """media_emb (N, E), class_emb (C, E), labels (N,) -> top-1 accuracy."""
    return (media_emb @ class_emb.T).argmax(-1).eq(labels).float().mean().item()


def max_over_prompts_accuracy(media_emb: torch.Tensor, prompt_embs: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Each class scores by its best-matching prompt: prompt_embs[c] is (prompts_c, E). For text towers whose
    sentence embeddings entangle the words, where the mean over prompts blurs the class."""
    scores = torch.stack([(media_emb @ p.T).amax(-1) for p in prompt_embs], dim=-1)  # (N, C)
    return scores.argmax(-1).eq(labels).float().mean().item()


def retrieval_recall(media_emb: torch.Tensor, text_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Row i of each is a matching pair. A query counts as found at K if its partner ranks in the top K; texts
    identical to the partner count as the partner (shapes captions repeat)."""
    sims = media_emb @ text_emb.T  # (N, N)
    same_text = (text_emb @ text_emb.T) > 1 - 1e-5  # (N, N): duplicates of each text
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        correct = same_text.float()  # a hit is any text equal to the partner (symmetric for both directions)
        order = s.argsort(dim=-1, descending=True)
        hits = correct.gather(1, order)  # (N, N): 1 where the ranked item is a correct match
        for k in ks:
            out[f"{name}_R@{k}"] = hits[:, :k].amax(-1).mean().item()
    return out
