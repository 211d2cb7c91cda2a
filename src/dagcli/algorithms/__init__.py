"""Training objectives behind one interface (`base.Algorithm`): DAG-DB, DAG-KL, DAG-RDB and RTB (GFlowNet),
DDPO, GRPO and DiffusionNFT (RL baselines).

`ALGORITHMS` is the one list of them: the config's sections and their validation, `dag train --help` and error
messages read it. Each reads its own config section (`settings`, declared beside it in `<name>_settings.py`) and
trains on one loss unit (`unit`: transitions, trajectories or samples, see `dagcli.units`); it is built with
`build_algorithm`. This module imports no torch, so the command line can list the algorithms without loading it.

Adding an algorithm: its module (the `Algorithm`), its settings module (a `Section`), one line here; or, from
outside the package (a notebook, a research fork), `register_algorithm(AlgorithmInfo(...))` before the run is
configured, which adds its name and its config section exactly as a line here would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dagcli.algorithms import dag_settings, ddpo_settings, grpo_settings, nft_settings, rtb_settings
from dagcli.algorithms.settings import Section

if TYPE_CHECKING:
    from dagcli.algorithms.base import Algorithm, Context


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    settings: Section  # the config section it reads: its keys, checks and help
    summary: str
    min_micro_batch: int
    build: Callable[[object, Context], Algorithm]  # (its config section, context) -> algorithm
    # (the run's config) -> trajectories per prompt group: each sampler call draws a prompt per group and repeats
    # it this many times (1: every trajectory draws its own prompt)
    group_size: Callable[[object], int] = lambda config: 1
    unit: str = "transitions"  # what a micro-batch holds: transitions | trajectories | samples (`dagcli.units`)
    deterministic_sampling: bool = False  # trains on deterministic samples too: sampling.eta = 0 is allowed
    # (the run's config) -> sampler settings ("sampling.eta": ...) it uses where the run leaves them unset, before
    # the model's defaults
    sampling_defaults: Callable[[object], dict] = lambda config: {}

    @property
    def section(self) -> str:
        return self.settings.name


def _dag(kl: bool, relative: bool = False):
    def build(settings, ctx: Context) -> Algorithm:
        from dagcli.algorithms.dag import Dag

        return Dag(settings, ctx, kl=kl, relative=relative)

    return build


def _ddpo(settings, ctx: Context) -> Algorithm:
    from dagcli.algorithms.ddpo import Ddpo

    return Ddpo(settings, ctx)


def _grpo(settings, ctx: Context) -> Algorithm:
    from dagcli.algorithms.grpo import Grpo

    return Grpo(settings, ctx)


def _rtb(settings, ctx: Context) -> Algorithm:
    from dagcli.algorithms.rtb import Rtb

    return Rtb(settings, ctx)


def _nft(settings, ctx: Context) -> Algorithm:
    from dagcli.algorithms.nft import Nft

    return Nft(settings, ctx)


ALGORITHMS: dict[str, AlgorithmInfo] = {
    "dag-db": AlgorithmInfo("dag-db", dag_settings.SECTION, "GFlowNet detailed balance with a forward-looking flow", 1,
                            _dag(False)),
    "dag-kl": AlgorithmInfo("dag-kl", dag_settings.SECTION, "GFlowNet KL / REINFORCE variant of DAG", 2, _dag(True)),
    "dag-rdb": AlgorithmInfo("dag-rdb", dag_settings.SECTION,
                             "relative DB: DAG-DB with the base model's own step for P_B", 1, _dag(False, relative=True)),
    "ddpo": AlgorithmInfo("ddpo", ddpo_settings.SECTION, "DDPO: PPO on per-prompt normalised rewards (RL baseline)", 1,
                          _ddpo),
    "grpo": AlgorithmInfo("grpo", grpo_settings.SECTION,
                          "GRPO (Flow-GRPO): group-normalised advantages, KL to the base model", 1, _grpo,
                          group_size=lambda config: config.grpo.group_size),
    "rtb": AlgorithmInfo("rtb", rtb_settings.SECTION,
                         "relative trajectory balance: the base model tilted by the reward, log Z per prompt", 1,
                         _rtb, group_size=lambda config: config.rtb.group_size, unit="trajectories"),
    "nft": AlgorithmInfo("nft", nft_settings.SECTION, "DiffusionNFT: clean samples re-noised, implicit v± policies",
                         1, _nft, group_size=lambda config: config.nft.group_size, unit="samples",
                         deterministic_sampling=True, sampling_defaults=nft_settings.sampling_defaults),
}


def build_algorithm(name: str, config, ctx: Context) -> Algorithm:
    """The algorithm `name` with its own section of the run's config."""
    from dagcli.errors import unknown_choice

    if name not in ALGORITHMS:
        raise unknown_choice("algorithm", name, ALGORITHMS)
    info = ALGORITHMS[name]
    return info.build(getattr(config, info.section), ctx)


def register_algorithm(info: AlgorithmInfo) -> None:
    """Add an algorithm defined outside this package: `--algorithm NAME`, its `[section]` table with its checks and
    defaults, checkpoints and resume then work as for the built-in ones (the run's `Config` is rebuilt with the
    section on its next use). Its section may be a new one or an existing one, shared as dag-db and dag-kl share
    `[dag]`; a name or a section name already taken by something else is refused."""
    from dagcli.errors import DagError

    if info.name in ALGORITHMS:
        raise DagError(f"an algorithm named {info.name!r} is already registered: choose another name")
    taken = sections().get(info.section)
    if taken is not None and taken is not info.settings:
        raise DagError(f"the config section [{info.section}] already belongs to "
                       f"{', '.join(n for n, i in ALGORITHMS.items() if i.section == info.section)}: reuse its "
                       f"Section object or name the section differently")
    ALGORITHMS[info.name] = info


def sections() -> dict[str, Section]:
    """Every algorithm's config section, once each, in the registry's order."""
    return {info.section: info.settings for info in ALGORITHMS.values()}


__all__ = ["ALGORITHMS", "AlgorithmInfo", "build_algorithm", "register_algorithm", "sections"]
