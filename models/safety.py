"""Safety checks: prompts by klein's own text encoder file run as the Qwen3 chat model it is (a yes/no question, read
from the answer tokens' probabilities: no second download), images by a ViT image classifier.

What a check can and cannot do is in the README's "Safety checks" section: both are classifiers with false
positives and false negatives, not guarantees.
"""

import numpy as np
import torch
from PIL import Image

from ..errors import KleinError
from .offload import compute_device
from .text_encoder import check_prompts

# The default policy: what a prompt check flags unless told otherwise (README: "Safety checks").
DEFAULT_POLICY = {
    "minors": "sexual or sexualised content involving a minor: anyone described as, or looking like, a child or "
              "teenager",
    "non_consensual": "intimate or sexual imagery of a real person without their consent, including undressing or "
                      "nudifying a person shown in a photo",
    "real_person_sexual": "sexual or nude depictions of a real, identifiable person (a named celebrity, politician or "
                          "private individual)",
}
OPTIONAL_CATEGORIES = {
    "sexual": "any sexually explicit or nude content",
    "violence": "graphic violence, gore or torture",
    "hate": "hateful symbols or content demeaning people for a protected characteristic",
    "self_harm": "content encouraging suicide or self-harm",
}
QUESTION = (
    "You are the safety filter of an image generator. These requests are not allowed:\n{categories}\n\n"
    "Request:\n\"\"\"\n{prompt}\n\"\"\"\n\n"
    "Does the request ask for an image in any of the categories that are not allowed? Answer with one word: yes or no."
)
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
YES, NO = ("yes", "Yes", "YES"), ("no", "No", "NO")
NEUTRAL = 0.5  # what a flagged image becomes: flat mid grey


class PromptSafety:
    """`checker(prompts)` -> P(unsafe) per prompt: the chat model's probability of answering yes rather than no to
    QUESTION under `policy` ({name: description}), over the answer tokens' first ids."""

    def __init__(self, model, tokenizer, policy=None, question=QUESTION):
        if not model.params.lm_head:
            raise KleinError("the prompt check needs the whole Qwen3 chat model (load_prompt_safety builds it)")
        self.model, self.tokenizer = model, tokenizer
        policy = DEFAULT_POLICY if policy is None else policy
        self.policy = dict(policy) if isinstance(policy, dict) else {}
        if not self.policy or not all(isinstance(v, str) and v.strip() for v in self.policy.values()):
            raise KleinError("a safety policy is a non-empty {name: description} mapping of what is not allowed")
        self.question = question
        first = lambda words: sorted({self.tokenizer.encode(w, add_special_tokens=False).ids[0] for w in words})  # noqa: E731
        self.yes, self.no = first(YES), first(NO)
        if set(self.yes) & set(self.no):
            raise KleinError("this tokenizer cannot tell the answers 'yes' and 'no' apart by their first token")

    def chat(self, prompt):
        """The exact text the model reads for one prompt."""
        categories = "\n".join(f"- {name.replace('_', ' ')}: {text}" for name, text in self.policy.items())
        return CHAT.format(self.question.format(categories=categories, prompt=prompt))

    def token_ids(self, prompts):
        ids = [self.tokenizer.encode(self.chat(p), add_special_tokens=False).ids for p in prompts]
        length = max(len(i) for i in ids)
        return (torch.tensor([i + [0] * (length - len(i)) for i in ids]),
                torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids]))

    @torch.inference_mode()
    def __call__(self, prompts: str | list[str]) -> list[float]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_prompts(prompts)
        device = compute_device(self.model)
        scores = []
        for prompt in prompts:  # one at a time: no padding inside the chat, the same numbers alone or in a batch
            ids, mask = self.token_ids([prompt])
            logits = self.model.next_token_logits(ids.to(device), mask.to(device), self.yes + self.no)
            probabilities = torch.softmax(logits.float(), dim=-1)[0]
            scores.append(float(probabilities[: len(self.yes)].sum()))
        return scores

    def check(self, prompt: str, threshold: float) -> tuple[float, dict]:
        """(P(unsafe), what a save records of the check: score, threshold, verdict, policy names; never the prompt)."""
        (score,) = self([prompt])
        return score, {"check": "prompt", "score": round(score, 4), "threshold": threshold, "passed": score < threshold,
                       "policy": sorted(self.policy)}


def flagged_prompt(score, threshold):
    """What the node, Klein Generate and the CLI say of a prompt the check flagged (record["passed"] False)."""
    return f"the prompt was flagged by the prompt check (P(unsafe) {score:.3f} >= {threshold})"


def unsafe_labels(id2label):
    """Indices of a classifier's labels that mean unsafe (Falconsai: "nsfw"; others: porn, hentai, explicit ...)."""
    words = ("nsfw", "unsafe", "porn", "hentai", "explicit", "sexual", "nude")
    found = [int(i) for i, name in id2label.items() if any(w in str(name).lower() for w in words)]
    if not found:
        raise KleinError(f"none of the classifier's labels ({', '.join(map(str, id2label.values()))}) reads as unsafe; "
                         "pass unsafe_labels=[...]")
    return found


class ImageSafety:
    """`classify(images)` -> P(unsafe) per image for ComfyUI IMAGE tensors (B, H, W, 3) in 0..1 or PIL images, with
    the classifier's own preprocessing (resize, rescale, normalise as its preprocessor_config.json says)."""

    def __init__(self, model, id2label, preprocessing, unsafe=None):
        self.model, self.id2label = model, id2label
        self.unsafe = unsafe_labels(id2label) if unsafe is None else list(unsafe)
        self.size = preprocessing["size"]
        self.resample = preprocessing["resample"]
        self.mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
        self.rescale = preprocessing["rescale"]

    def pixels(self, images):
        """(B, 3, h, w) model input: each image as uint8 (ComfyUI's save rounding), resized with PIL as the
        Hugging Face image processor does, rescaled and normalised."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[-1] not in (3, 4):
                raise KleinError(f"an IMAGE batch (B, H, W, 3) is needed, got shape {tuple(images.shape)}")
            array = np.clip(255.0 * images[..., :3].float().cpu().numpy(), 0, 255).round().astype(np.uint8)
            images = [Image.fromarray(frame) for frame in array]
        resized = [np.asarray(image.convert("RGB").resize(self.size[::-1], self.resample), dtype=np.float32)
                   for image in images]
        batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2) * self.rescale
        return (batch - self.mean) / self.std

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> list[float]:
        device = next(self.model.parameters()).device
        logits = self.model(self.pixels(images).to(device)).float()
        return torch.softmax(logits, dim=-1)[:, self.unsafe].sum(-1).cpu().tolist()

    def screen(self, images: torch.Tensor, threshold: float,
               replace: bool = True) -> tuple[torch.Tensor, list[float], list[bool]]:
        """(images with the flagged ones replaced by flat grey when `replace`, scores, flagged) for an IMAGE batch."""
        scores = self.classify(images)
        flagged = [score >= threshold for score in scores]
        if replace and any(flagged):
            images = images.clone()
            images[[i for i, f in enumerate(flagged) if f]] = NEUTRAL
        return images, scores, flagged

    def report(self, scores: list[float], flagged: list[bool], replaced: bool) -> list[str]:
        return [f"image {i + 1}: P(unsafe) {s:.3f} "
                + (("flagged, replaced" if replaced else "flagged") if f else "passed")
                for i, (s, f) in enumerate(zip(scores, flagged))]


def image_record(classifier, threshold, scores, flagged, replaced):
    """What a save records of an image check (never the prompt)."""
    return {"check": "image", "classifier": classifier, "threshold": threshold, "scores": [round(s, 4) for s in scores],
            "passed": not any(flagged), "replaced": bool(replaced and any(flagged))}

