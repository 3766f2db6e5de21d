"""The admin: sequences and the ledger, read-only; freeze, unfreeze and void as actions.

Nothing here writes numbering's tables directly: the actions call numbering's own
functions (in one transaction on the sequence's lock), and nothing can be added, changed
or deleted through the admin (the ledger is append-only; a sequence that gave numbers is
a record).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import router, transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from numbering.django.models import Counter, LedgerEntry
from numbering.errors import NumberingError


def _run(model: type[Any], work: Any) -> Any:
    """``work(bind)`` in one transaction on the database ``model`` is written to."""
    from django.db import connections

    from numbering.django.connection import borrowed

    alias = router.db_for_write(model)
    with transaction.atomic(using=alias), borrowed(connections[alias]) as bind:
        return work(bind)


class _ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Counter)
class CounterAdmin(_ReadOnly):
    list_display = ("name", "last_value", "next_value", "next_formatted", "cycle", "frozen")
    list_filter = ("frozen", "period")
    search_fields = ("name",)
    actions = ("freeze", "unfreeze")

    @admin.display(description="next value")
    def next_value(self, counter: Counter) -> int | None:
        from numbering.sequences import SequenceInfo

        return SequenceInfo._from_row(counter).next_value

    @admin.display(description="next number (preview)")
    def next_formatted(self, counter: Counter) -> str:
        from numbering.sequences import preview

        if not counter.format or counter.parent_id is not None:
            return "-"
        try:
            return _run(Counter, lambda bind: preview(bind, counter.name)) or "-"
        except NumberingError as exc:
            return f"({exc})"

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The actions need it on the list; a sequence itself is never edited (view only).
        return obj is None and bool(request.user.has_perm("numbering.change_counter"))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in Counter._meta.fields]

    def _set_frozen(self, request: HttpRequest, queryset: QuerySet[Any], frozen: bool) -> None:
        from numbering.sequences import set_frozen

        done = []
        for counter in queryset:
            name, period = counter.name, counter.period_key
            if counter.parent_id is not None:
                name = Counter.objects.using(queryset.db).get(pk=counter.parent_id).name
            try:
                _run(Counter, lambda bind, n=name, p=period: set_frozen(bind, n, frozen, p))
                done.append(counter.name)
            except NumberingError as exc:
                self.message_user(request, f"{counter.name}: {exc}", messages.ERROR)
        if done:
            what = "frozen" if frozen else "unfrozen"
            self.message_user(request, f"{what}: {', '.join(done)}", messages.SUCCESS)

    @admin.action(description="Freeze: refuse new numbers", permissions=["change"])
    def freeze(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._set_frozen(request, queryset, True)

    @admin.action(description="Unfreeze: accept new numbers again", permissions=["change"])
    def unfreeze(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._set_frozen(request, queryset, False)


class VoidForm(forms.Form):
    reason = forms.CharField(
        max_length=500, help_text="Why these numbers are void (auditors will read it)."
    )


@admin.register(LedgerEntry)
class LedgerAdmin(_ReadOnly):
    list_display = (
        "sequence",
        "value",
        "count",
        "formatted",
        "request_key",
        "status",
        "assigned_at",
    )
    list_filter = ("status",)
    search_fields = ("request_key", "formatted", "sequence__name")
    list_select_related = ("sequence",)
    actions = ("void",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The void action needs it on the list; an entry itself is never edited.
        return obj is None and bool(request.user.has_perm("numbering.change_ledgerentry"))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in LedgerEntry._meta.fields]

    @admin.action(
        description="Void: the numbers stay, marked void, with a reason",
        permissions=["change"],
    )
    def void(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        from numbering.ledger import void

        form = VoidForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return TemplateResponse(
                request,
                "admin/numbering/void.html",
                {
                    **self.admin_site.each_context(request),
                    "title": "Void numbers",
                    "entries": queryset,
                    "form": form,
                    "opts": self.model._meta,
                    "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                },
            )
        reason = form.cleaned_data["reason"]
        done = []
        for entry in queryset.select_related("sequence"):
            counter = entry.sequence
            name = counter.name
            if counter.parent_id is not None:
                name = Counter.objects.using(queryset.db).get(pk=counter.parent_id).name
            try:
                _run(
                    LedgerEntry,
                    lambda bind, n=name, e=entry: void(bind, n, reason=reason, key=e.request_key),
                )
                done.append(str(entry))
            except NumberingError as exc:
                self.message_user(request, f"{entry}: {exc}", messages.ERROR)
        if done:
            self.message_user(request, f"voided: {', '.join(done)}", messages.SUCCESS)
        return None
