"""What the built-in models add to the engine, through the hooks any plugin uses (`dagcli.extensions`, the
prompt-set registry): their names, folders and random builders, training defaults, tiny CLIP, x̂0 decoder, the
shapes prompt sets and the pixel judge of their captions. Imported by `dagcli.extensions.load`; light (no torch).
"""

from __future__ import annotations

from dagcli import extensions
from dagcli.builtin import (
    BUILTIN_TRAIN_DEFAULTS,
    PRETRAINED_DIRS,
    RANDOM_NAMES,
    TINY_CLIP_DIR,
    TINY_DECODER_DIR,
    TINY_DECODER_NAME,
    TINY_NAME,
    TINY_RANDOM_NAME,
)
from dagcli.prompts import register_prompt_set

CLIP_LABEL = "the built-in tiny CLIP"  # how reports name TINY_CLIP_DIR


def _read(image):
    from dagcli.builtin.dataset import judge_pixels

    return judge_pixels(image)


def _parse_caption(text: str):
    from dagcli.builtin.dataset import parse_caption

    return parse_caption(text)


def _backgrounds() -> tuple[str, ...]:
    from dagcli.builtin.dataset import BACKGROUNDS

    return tuple(BACKGROUNDS)


SHAPES_JUDGE = extensions.PixelJudge(read=_read, parse_caption=_parse_caption, backgrounds=_backgrounds)


def _builder(name: str):
    def build(seed: int):
        from dagcli.builtin.random_models import RANDOM_MODELS

        return RANDOM_MODELS[name](seed)

    return build


def _shapes(split: str):
    def load() -> list[str]:
        from dagcli.builtin import dataset

        return list(dataset.heldout_captions() if split == "heldout" else dataset.train_captions())

    return load


def _shapes_without_background() -> list[str]:
    """"a red circle", ...: every colour x shape of the built-in data set, naming neither size nor background (so
    the model chooses the background; see the `background-modes` reward)."""
    from dagcli.builtin import dataset

    specs = [dataset.ShapeSpec(c, s, "black", "small", 0.0, 0.0, 0.0) for c in dataset.COLOURS for s in dataset.SHAPES]
    return sorted(dataset.caption(spec, mention_size=False, mention_background=False) for spec in specs)


def register() -> None:
    # the shapes models: the tiny CLIP judges them and the pixel judge reads their captions
    shapes = {"embed_model": TINY_CLIP_DIR, "embed_label": CLIP_LABEL, "judge": SHAPES_JUDGE}
    for name, folder in PRETRAINED_DIRS.items():
        extensions.register_model(extensions.NamedModel(
            name, folder=folder, train_defaults=BUILTIN_TRAIN_DEFAULTS, default_rank=0 if name == TINY_NAME else None,
            **shapes))
    for name in RANDOM_NAMES:
        extra = {**shapes, "default_rank": 1} if name == TINY_RANDOM_NAME else {}
        extensions.register_model(extensions.NamedModel(name, build=_builder(name),
                                                        train_defaults=BUILTIN_TRAIN_DEFAULTS, **extra))
    extensions.register_decoder(TINY_DECODER_NAME, TINY_DECODER_DIR)
    extensions.register_judge("shapes", SHAPES_JUDGE)
    register_prompt_set("shapes", _shapes("train"))
    register_prompt_set("shapes-heldout", _shapes("heldout"))
    register_prompt_set("shapes-no-background", _shapes_without_background)


register()
