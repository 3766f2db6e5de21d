"""numbering's settings, kept at the design card's place for deployments.

The settings live in the library core (:mod:`numbering.settings`), so that ``import
numbering`` depends on nothing under ``config/``; this module re-exports them for code
and documentation that name ``numbering.config.settings``.
"""

from __future__ import annotations

from numbering import settings as _core
from numbering.settings import *  # noqa: F403  (the same names, from the core)

__all__ = list(_core.__all__)
