"""Pixel judges: on a model that registers one (`NamedModel.judge`, the built-in models), what each image's
pixels show against what its caption names, as shares per colour, background and shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# What the pixel judges read, and the report keys of their shares.
PIXEL_ATTRIBUTES = ("colour", "background", "shape")
PIXEL_METRICS = tuple(f"pixel_{a}" for a in PIXEL_ATTRIBUTES)


def model_judge(model: str | None):
    """The pixel judge a named model registers (`NamedModel.judge`), else None."""
    from dagcli.extensions import named_model

    named = named_model(model)
    return named.judge if named is not None else None


def shapes_judge():
    """The pixel judge of the shapes captions (`dagcli.extensions.judge`)."""
    from dagcli.extensions import judge

    return judge("shapes")


def uses_pixel_judges(model: str | None, prompts: Sequence[str]) -> bool:
    """Whether the pixel judges apply: a model with a pixel judge and at least one prompt that is its caption."""
    return model_judge(model) is not None and any(caption_wants(p) is not None for p in prompts)


def caption_wants(prompt: str):
    """The attributes a shapes caption names (`ParsedCaption`), or None when the prompt is not one."""
    parsed = shapes_judge().parse_caption(prompt)
    return parsed if parsed.colour is not None and parsed.shape is not None else None


def judge_images(images: Sequence) -> list[dict[str, str | None]]:
    """What each image's pixels show: {'colour', 'background', 'shape'} names (colour/shape None if blank)."""
    read = shapes_judge().read
    out = []
    for image in images:
        seen = read(np.asarray(image.convert("RGB")))
        out.append({a: getattr(seen, a) for a in PIXEL_ATTRIBUTES})
    return out


def pixel_matches(seen: dict[str, str | None], prompt: str) -> dict[str, bool | None]:
    """Per attribute, whether the pixels show what the prompt names; None where the prompt names nothing."""
    wants = caption_wants(prompt)
    if wants is None:
        return {a: None for a in PIXEL_ATTRIBUTES}
    return {a: None if getattr(wants, a) is None else seen[a] == getattr(wants, a) for a in PIXEL_ATTRIBUTES}


def pixel_shares(seen: Sequence[dict], prompts: Sequence[str]) -> dict[str, float | None]:
    """'pixel_<attribute>' -> share of the images whose pixels match their prompt (None: nothing to judge)."""
    matches = [pixel_matches(s, p) for s, p in zip(seen, prompts, strict=True)]
    out = {}
    for attribute, key in zip(PIXEL_ATTRIBUTES, PIXEL_METRICS, strict=True):
        judged = [m[attribute] for m in matches if m[attribute] is not None]
        out[key] = float(np.mean(judged)) if judged else None
    return out
