"""What extends the engine from outside it: named models, x̂0 decoders and pixel judges, registered through the
hooks below by the package's own built-in models (`dagcli.builtin.extension`) exactly as an installed plugin
would (a `dagcli.extensions` entry point naming a module that calls them when imported). Prompt sets and rewards
have their own registries (`prompts.register_prompt_set`, `rewards.registry.register_reward`).

Every reader calls `load()` first, so the registries are full whichever command asks; nothing here imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from dagcli.errors import DagError

ENTRY_POINT_GROUP = "dagcli.extensions"
SHIPPED = ("dagcli.builtin.extension",)  # the modules of this package that register through these hooks


@dataclass(frozen=True)
class PixelJudge:
    """Reads what an image's pixels show against what its caption names, without a learned model."""

    read: Callable  # image (PIL or [H, W, 3] uint8 array) -> an object with colour / background / shape names
    parse_caption: Callable  # caption -> an object with the same attributes, None for those it does not name
    backgrounds: Callable[[], tuple[str, ...]]  # every background name `read` can give


@dataclass(frozen=True)
class NamedModel:
    """A model `--model` accepts by name."""

    name: str  # the `--model` name
    folder: Path | None = None  # its pipeline folder (shipped weights); None: built in code by `build`
    build: Callable[[int], object] | None = None  # seed -> a pipeline with random weights (None: read `folder`)
    train_defaults: dict = field(default_factory=dict)  # training defaults its dagcli.json may override
    embed_model: Path | None = None  # the CLIP of its default `clip` reward and `dag eval` embeddings (None: none)
    embed_label: str = ""  # how the report names `embed_model`
    judge: PixelJudge | None = None  # the pixel judge of its captions (None: none)
    default_rank: int | None = None  # the model taken when none is named: the lowest rank that is available

    def available(self) -> bool:
        """Built in code, or its folder ships with this install."""
        return self.folder is None or (self.folder / "model_index.json").is_file()


_MODELS: dict[str, NamedModel] = {}  # `--model` name -> its entry, in registration order
_DECODERS: dict[str, Path] = {}  # `dag.x0_decoder` name -> its AutoencoderTiny folder
_JUDGES: dict[str, PixelJudge] = {}  # data set name -> the pixel judge of its captions
_loaded: list[str] = []  # the extension modules imported so far


def register_model(model: NamedModel) -> None:
    _MODELS[model.name] = model


def register_decoder(name: str, folder: Path) -> None:
    _DECODERS[name] = folder


def register_judge(name: str, judge: PixelJudge) -> None:
    _JUDGES[name] = judge


def load() -> None:
    """Import the shipped extension modules and those of installed `dagcli.extensions` entry points, once."""
    if _loaded:
        return
    _loaded.append("")
    for module in SHIPPED:
        _import(module, module)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _import(ep.value, f"extension {ep.name!r} (entry point {ep.value})")


def _import(module: str, label: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as e:  # third-party code may raise anything
        raise DagError(f"{label} failed to load: {type(e).__name__}: {e}") from e
    _loaded.append(module)


def named_models() -> dict[str, NamedModel]:
    load()
    return dict(_MODELS)


def named_model(model: str | Path | None) -> NamedModel | None:
    """The entry of a `--model` name, or of the path of a shipped pipeline folder (however it is spelt)."""
    if not model:
        return None
    models = named_models()
    if str(model) in models:
        return models[str(model)]
    try:
        path = Path(model).expanduser().resolve()
        return next((m for m in models.values() if m.folder is not None and m.folder.resolve() == path), None)
    except OSError:
        return None


def decoders() -> dict[str, Path]:
    load()
    return dict(_DECODERS)


def judge(name: str) -> PixelJudge:
    """The pixel judge registered as `name`, or a DagError naming those there are."""
    load()
    if name not in _JUDGES:
        raise DagError(f"no pixel judge {name!r} in this install; valid options: {', '.join(_JUDGES) or 'none'}")
    return _JUDGES[name]
