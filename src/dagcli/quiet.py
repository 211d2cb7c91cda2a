"""Silence the model libraries' logging and warnings around a load whose failure is reported in one line."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_libraries():
    """Inside the block the model libraries log nothing below errors and warn nothing (diffusers reports every
    mismatched key on its own lines before it raises)."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
