"""Errors the pack raises for bad input: each message names the file and what was found."""


class KleinError(ValueError):
    """Base class: a problem with user input (file, model, size) rather than a bug."""


class CheckpointError(KleinError):
    """A weight file that cannot be read: wrong format, truncated, lying header, unsupported dtype."""


class WrongModelError(KleinError):
    """A readable file that holds a different model than the slot expects."""


class KleinNote(UserWarning):
    """Something the pack changed or left out of the user's input (a size rounded, a reference cropped, a prompt cut,
    LoRA keys unused): a warning for library users, a line under the node in ComfyUI, one `note:` line in the CLI."""
