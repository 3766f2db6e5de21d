"""URLs for the Django tests (tests/integration/test_django.py): the admin."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
