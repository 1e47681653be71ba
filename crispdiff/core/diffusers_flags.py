"""diffusers' example-script flags on crispdiff's scripts: other spellings, flags refused with what to use instead,
and the note that says which crispdiff defaults differ from the diffusers script a command line was written for.

Why one module: crispdiff's scripts are meant to run the command lines users copied from diffusers' READMEs
(``train_unconditional.py``, ``train_dreambooth_lora.py``, ``train_text_to_image_lora.py`` and their SDXL
versions). Where a flag means the same thing under another name, the name is an alias of crispdiff's flag here; where
a flag cannot make sense in crispdiff, the config class lists it in ``refused_flags`` and using it is a one-line
error; where crispdiff's default differs on purpose, ``defaults_note`` says so once at the start of the run.
``tests/test_diffusers_flags.py`` compares every flag of the reference scripts with the scripts' ``--help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

from crispdiff.core.errors import FlagError

#: Other names of crispdiff's flags (field name -> extra option names), accepted wherever the field is a flag. Most
#: are diffusers' names for the same setting; ``rank`` / ``lora_rank`` makes one LoRA-rank name work for every trainer.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_epochs": ("num_train_epochs",),
    "validation_epochs": ("save_images_epochs",),
    "ema_decay": ("ema_max_decay",),
    "report_to": ("logger",),
    "num_validation_images": ("eval_batch_size",),
    "validation_inference_steps": ("ddpm_num_inference_steps",),
    "num_train_timesteps": ("ddpm_num_steps",),
    "beta_schedule": ("ddpm_beta_schedule",),
    "interpolation": ("image_interpolation_mode",),
    "rank": ("lora_rank",),
    "lora_rank": ("rank",),
    "export_kohya": ("output_kohya_format",),
}

#: diffusers' value names that crispdiff spells differently (field -> {diffusers' value: crispdiff's}).
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "beta_schedule": {"squaredcos_cap_v2": "cosine"},
    "optimizer": {"adamw": "AdamW"},  # diffusers lower-cases the name
}


def option_names(field_name: str, config_fields: set[str]) -> list[str]:
    """``--field`` and its aliases (an alias that is itself a field of this config is left to that field)."""
    aliases = [a for a in FLAG_ALIASES.get(field_name, ()) if a not in config_fields]
    return [f"--{field_name}", *(f"--{a}" for a in aliases)]


def accepted_values(field_name: str, choices: list[str] | None) -> list[str] | None:
    """A flag's choices plus diffusers' spellings of them."""
    if not choices:
        return choices
    return [*choices, *(k for k in VALUE_ALIASES.get(field_name, {}) if k not in choices)]


def canonical_values(config: Any) -> None:
    """Replace diffusers' value spellings by crispdiff's (``squaredcos_cap_v2`` -> ``cosine``)."""
    for name, mapping in VALUE_ALIASES.items():
        value = getattr(config, name, None)
        if isinstance(value, str) and value in mapping:
            setattr(config, name, mapping[value])


class RefusedFlag(argparse.Action):
    """A flag that cannot make sense here: using it is a one-line ``FlagError`` saying why and what to use.

    Either one of diffusers' flags crispdiff has no counterpart for, or a crispdiff flag that one script refuses
    (``own_flag``: train_transfer.py's architecture flags, where the pretrained model decides the architecture).
    """

    def __init__(self, option_strings: list[str], dest: str, reason: str = "", own_flag: bool = False, **kwargs: Any):
        self.reason = reason
        self.own_flag = own_flag
        super().__init__(option_strings, dest, nargs="*", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        where = "here" if self.own_flag else "by crispdiff"
        raise FlagError(f"{option_string} is not supported {where}: {self.reason}")


def add_refused_flags(
    parser: argparse.ArgumentParser, refused: dict[str, str], own_flags: Collection[str] = ()
) -> None:
    """Register each refused flag (shown in ``--help`` with its reason) so that using it fails with that reason;
    ``own_flags`` are the names that are crispdiff flags elsewhere (refused by this script only)."""
    for name, reason in refused.items():
        own = name in own_flags
        parser.add_argument(
            f"--{name}",
            action=RefusedFlag,
            dest=f"refused_{name}",
            reason=reason,
            own_flag=own,
            help=(f"Refused here: {reason}" if own else f"Refused (diffusers' flag): {reason}").replace("%", "%%"),
        )


#: Flags of diffusers' scripts that crispdiff refuses, and why (one line each, naming what to use instead).
PRESERVE_INPUT_PRECISION = (
    "crispdiff decodes every image once into an 8-bit RGB cache, so 16-bit input precision is not kept; drop the flag"
)
CLASS_LABELS_CONDITIONING = (
    "Stable Diffusion 1.x/2.x UNets take no class labels (the flag is for DeepFloyd IF); drop it"
)
VALIDATION_IMAGES = (
    "validation here is text-to-image from --validation_prompt (the flag is for image-conditioned IF upscalers); "
    "drop it"
)


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def defaults_note(config: Any) -> str | None:
    """One line naming the crispdiff defaults in force that differ from the diffusers script this config stands in
    for, limited to flags the user did not pass (``config.explicit_flags``); None when there are none, or when the
    config was not parsed from a command line or has no diffusers counterpart."""
    script = getattr(type(config), "diffusers_script", None)
    given = getattr(config, "explicit_flags", None)
    if not script or given is None:
        return None
    differing = []
    for name, theirs in type(config).diffusers_defaults.items():
        if name in given or not hasattr(config, name):
            continue
        ours = getattr(config, name)
        if ours != theirs:
            differing.append(f"--{name} {_shown(ours)} (diffusers: {_shown(theirs)})")
    if not differing:
        return None
    return (
        f"crispdiff: defaults that differ from diffusers' {script}, in force because these flags were not passed: "
        + ", ".join(differing)
        + ". Pass a flag to choose otherwise."
    )
