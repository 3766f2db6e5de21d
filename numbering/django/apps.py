"""The Django app: ``INSTALLED_APPS = [..., "numbering.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class NumberingConfig(AppConfig):
    name = "numbering.django"
    label = "numbering"
    verbose_name = "numbering"
    default_auto_field = "django.db.models.BigAutoField"
