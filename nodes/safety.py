"""Klein Prompt Check and Klein Image Check: klein's own text encoder as a prompt classifier, a ViT image
classifier from models/safety; results are kept per node so Klein Watermark & Save records them (not the prompt)."""

import warnings

import torch

from ..errors import KleinError, KleinNote
from ..loaders.safety import check_image_safety, load_image_safety, load_prompt_safety
from ..models.safety import DEFAULT_POLICY, flagged_prompt, image_record
from ..models.text_encoder import KleinTextEncoder
from .files import classifier_path, list_classifiers
from .runtime import load_for_inference, verdict

RESULTS = {}  # node id -> the last check it ran: what the save node records


def parse_policy(text):
    """'name: what is not allowed' per line -> {name: description}; empty -> the default policy."""
    policy = {}
    for line in (text or "").splitlines():
        if line.strip():
            name, sep, description = line.partition(":")
            if not sep or not name.strip() or not description.strip():
                raise KleinError(f"Klein Prompt Check: policy line {line.strip()!r} is not 'name: what is not allowed'")
            policy[name.strip()] = description.strip()
    return policy or dict(DEFAULT_POLICY)


def prompt_checker(text_encoder, policy):
    """The checker for this text encoder (its extra layers read once), with `policy`."""
    cached = getattr(text_encoder, "_klein_prompt_checker", None)
    if cached is None:
        cached = load_prompt_safety(text_encoder)
        text_encoder._klein_prompt_checker = cached
    cached.policy = policy
    return cached


class KleinPromptCheck:
    DESCRIPTION = ("Asks klein's own text encoder (run as the Qwen3 chat model it is; no extra download) whether the "
                   "prompt requests content the policy forbids. Flagged prompts stop the run unless 'block' is off.")
    CATEGORY = "klein"
    RETURN_TYPES = ("STRING", "BOOLEAN", "FLOAT")
    RETURN_NAMES = ("prompt", "passed", "score")
    OUTPUT_TOOLTIPS = ("The prompt, to wire into Klein Text Encode.", "True when the score is below the threshold.",
                       "P(unsafe) from the model's yes/no answer.")
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "text_encoder": ("KLEIN_TEXT_ENCODER", {"tooltip": "From Klein Load Text Encoder (the full qwen_3_4b "
                                                                   "file: the check reads its last layers too)."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt to check."}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01,
                                        "tooltip": "Flag at or above this P(unsafe)."}),
                "block": ("BOOLEAN", {"default": True, "tooltip": "Stop the run when the prompt is flagged."}),
            },
            "optional": {"policy": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "What is not allowed, one 'name: description' per line. Empty: sexual content involving minors, "
                "non-consensual intimate imagery, sexual content of real people.")})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def check(self, text_encoder: KleinTextEncoder, prompt: str, threshold: float = 0.5, block: bool = True,
              policy: str = "", unique_id: str | None = None) -> dict:
        rules = parse_policy(policy)
        checker = prompt_checker(text_encoder, rules)
        load_for_inference(checker.model, "text_encoder")
        score, record = checker.check(prompt, threshold)
        RESULTS[str(unique_id)], passed = record, record["passed"]
        line = f"prompt check: P(unsafe) {score:.3f} ({'passed' if passed else 'flagged'} at {threshold})"
        if not passed and block:
            raise KleinError(f"Klein Prompt Check: {flagged_prompt(score, threshold)}; the run stops here. Change the "
                             "prompt, or switch 'block' off to route it yourself.")
        return {"ui": {"text": [line]}, "result": (prompt, passed, score)}


class KleinImageCheck:
    DESCRIPTION = ("Classifies images with a ViT safety classifier from models/safety (e.g. Falconsai/"
                   "nsfw_image_detection); flagged images are replaced by flat grey.")
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE", "BOOLEAN", "FLOAT")
    RETURN_NAMES = ("images", "passed", "score")
    OUTPUT_TOOLTIPS = ("The images, flagged ones replaced by grey.", "True when no image was flagged.",
                       "The highest P(unsafe) of the batch.")
    FUNCTION = "check"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images to check."}),
                "classifier": (list_classifiers(), {"tooltip": "A folder in models/safety with config.json and "
                                                               "model.safetensors (Hugging Face ViT classifier)."}),
                "threshold": ("FLOAT", {"default": 0.85, "min": 0.01, "max": 0.99, "step": 0.01,
                                        "tooltip": "Flag at or above this P(unsafe) (BFL's reference: 0.85)."}),
                "replace": ("BOOLEAN", {"default": True, "tooltip": "Replace flagged images by flat grey."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, classifier: str | None = None) -> bool | str:
        return verdict(check_classifier, classifier)

    def check(self, images: torch.Tensor, classifier: str, threshold: float = 0.85, replace: bool = True,
              unique_id: str | None = None) -> dict:
        checker = image_checker(classifier_path(classifier))
        out, scores, flagged = checker.screen(images, threshold, replace)
        RESULTS[str(unique_id)] = image_record(classifier, threshold, scores, flagged, replace)
        return {"ui": {"text": checker.report(scores, flagged, replace)},
                "result": (out, not any(flagged), max(scores))}


def SAFETY_INPUTS():  # noqa: N802 (a spec built when ComfyUI asks, like INPUT_TYPES: the classifier list is live)
    return {
        "safety": (["off", "prompt", "image", "prompt+image"], {"default": "off", "tooltip": (
            "prompt: klein's own text encoder checks the prompt first (a flagged prompt stops the run); image: the "
            "classifier checks each result (flagged ones become grey). Saves record the checks.")}),
        "image_classifier": (["none", *list_classifiers()], {"default": "none", "tooltip": "From models/safety."}),
        "prompt_threshold": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01}),
        "image_threshold": ("FLOAT", {"default": 0.85, "min": 0.01, "max": 0.99, "step": 0.01}),
    }


class SafetyGate:
    """Klein Generate's checks: the prompt before anything runs, the images after decoding; the records are kept
    for Klein Watermark & Save."""

    def __init__(self, safety, classifier, prompt_threshold, image_threshold, unique_id):
        self.prompt, self.image = "prompt" in safety, "image" in safety
        if self.image and classifier in (None, "none"):
            raise KleinError("Klein Generate: safety 'image' needs an image classifier (a folder in models/safety)")
        self.classifier, self.thresholds, self.node = classifier, (prompt_threshold, image_threshold), str(unique_id)
        RESULTS[self.node] = []

    def check_prompt(self, text_encoder, prompt):
        if not self.prompt:
            return
        checker = prompt_checker(text_encoder, dict(DEFAULT_POLICY))
        load_for_inference(checker.model, "text_encoder")
        score, record = checker.check(prompt, self.thresholds[0])
        RESULTS[self.node].append(record)
        if not record["passed"]:
            raise KleinError(f"Klein Generate: {flagged_prompt(score, self.thresholds[0])}; nothing was generated")

    def check_images(self, images):
        if not self.image:
            return images
        checker = image_checker(classifier_path(self.classifier))
        images, scores, flagged = checker.screen(images, self.thresholds[1])
        RESULTS[self.node].append(image_record(self.classifier, self.thresholds[1], scores, flagged, True))
        for line in checker.report(scores, flagged, True):
            warnings.warn(f"image check: {line}", KleinNote)
        return images


IMAGE_CHECKERS = {}


def check_classifier(name):
    """A classifier folder's files checked from their headers (the run would load it only after generating)."""
    if name != "none":
        check_image_safety(classifier_path(name))


def image_checker(path):
    if path not in IMAGE_CHECKERS:
        IMAGE_CHECKERS.clear()  # one classifier kept at a time
        IMAGE_CHECKERS[path] = load_image_safety(path)
    return IMAGE_CHECKERS[path]


def checks_upstream(prompt, node_id, walk):
    """The results of the checks that ran upstream of node `node_id` in the API `prompt`, for the saved metadata."""
    found = []
    for current, node in walk(prompt, node_id):
        if node.get("class_type") in ("KleinPromptCheck", "KleinImageCheck", "KleinGenerate") and current in RESULTS:
            result = RESULTS[current]
            found.extend(result if isinstance(result, list) else [result])
    return found
