"""numbering's settings, kept at the design card's place for deployments.

The settings live in the library core (:mod:`numbering.settings`), so that ``import
numbering`` depends on nothing under ``config/``; this module re-exports them for code
and documentation that name ``numbering.config.settings``.
"""

from __future__ import annotations

from numbering.settings import (
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_FILE,
    DEFAULT_ISOLATION_LEVEL,
    DEFAULT_RESULT_BACKEND,
    ENV,
    Settings,
    check_database_url,
    mask_url,
)

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_DATABASE_FILE",
    "DEFAULT_ISOLATION_LEVEL",
    "DEFAULT_RESULT_BACKEND",
    "ENV",
    "Settings",
    "check_database_url",
    "mask_url",
]
