"""A real Django project written into a directory by the tests: ``manage.py``, a
``proj`` package (settings, the Celery app the way Celery's Django guide writes it) and
a ``shop`` app with a model and an ``IdempotentTask``. The tests run it in child
processes (``manage.py check``, ``migrate``, a ``celery worker``), so its settings are
its own, apart from the test process's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

MANAGE = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

CELERY = """\
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
"""

MODELS = """\
from django.db import models


class Payment(models.Model):
    order = models.CharField(max_length=100)
    cents = models.IntegerField()
"""

TASKS = """\
from celery import shared_task

from idempotask.integrations.celery import IdempotentTask

from .models import Payment


@shared_task(base=IdempotentTask, bind=True, idempotency_transactional=True)
def charge(self, order: str, cents: int) -> dict:
    payment = Payment.objects.create(order=order, cents=cents)
    return {"order": order, "payment": payment.pk}


@shared_task(base=IdempotentTask, bind=True, idempotency_transactional=True)
def refund(self, order: str) -> None:
    Payment.objects.create(order=f"refund-{order}", cents=-1)
    raise LookupError(f"no payment for {order}")
"""

SEND = '''\
"""Send each order's charge three times, wait for every result, print them as JSON."""
import json
import sys

import django

django.setup()

from idempotask.django.models import DeadLetterRecord  # noqa: E402
from shop.models import Payment  # noqa: E402
from shop.tasks import charge, refund  # noqa: E402

orders = sys.argv[1:]
sent = [(order, charge.delay(order, 500)) for order in orders for _ in range(3)]
results = [[order, result.get(timeout=60)] for order, result in sent]
counts = {order: Payment.objects.filter(order=order).count() for order in orders}
failed = refund.delay(orders[0])
failed.get(timeout=60, propagate=False)
letters = list(DeadLetterRecord.objects.values_list("function", "error_type", "status"))
refunds = Payment.objects.filter(order__startswith="refund-").count()
print(json.dumps({"results": results, "counts": counts, "letters": letters, "refunds": refunds}))
'''


def write_project(root: Path, settings: dict[str, Any]) -> Path:
    """Write the project under ``root`` with ``settings`` (values written with repr)."""
    (root / "proj").mkdir(parents=True)
    (root / "shop" / "migrations").mkdir(parents=True)
    (root / "manage.py").write_text(MANAGE)
    (root / "proj" / "__init__.py").write_text("from .celery import app as celery_app\n")
    (root / "proj" / "celery.py").write_text(CELERY)
    lines = [f"{name} = {value!r}" for name, value in settings.items()]
    (root / "proj" / "settings.py").write_text("\n".join(lines) + "\n")
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "migrations" / "__init__.py").write_text("")
    (root / "shop" / "models.py").write_text(MODELS)
    (root / "shop" / "tasks.py").write_text(TASKS)
    (root / "send.py").write_text(SEND)
    return root


def base_settings(databases: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "SECRET_KEY": "idempotask-tests",
        "USE_TZ": True,
        "INSTALLED_APPS": ["idempotask.django", "shop"],
        "DATABASES": databases,
        "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
        **extra,
    }


def environment(root: Path) -> dict[str, str]:
    inherited = os.environ.get("PYTHONPATH", "")  # e.g. another Django version first
    path = os.pathsep.join(p for p in (inherited, str(root), str(ROOT)) if p)
    return {**os.environ, "PYTHONPATH": path, "DJANGO_SETTINGS_MODULE": "proj.settings"}


def run(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python <args>`` in the project (``manage.py ...``, ``send.py ...``)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
