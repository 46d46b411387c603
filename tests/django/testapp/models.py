"""What a transactional body writes: one row per payment."""

from __future__ import annotations

from django.db import models  # type: ignore[import-untyped]


class Payment(models.Model):  # type: ignore[misc]
    order = models.CharField(max_length=100)
    amount = models.IntegerField()

    class Meta:
        app_label = "testapp"
