"""Deployment configuration for numbering, installed as ``numbering.config``.

The repository keeps the design card's top-level ``config/`` folder; the package build
maps it to ``numbering.config`` so that installing numbering never adds a top-level
``config`` module that would shadow a user's own (many Django projects have one).
"""

from __future__ import annotations

from numbering.settings import ENV, Settings, mask_url

__all__ = ["ENV", "Settings", "mask_url"]
