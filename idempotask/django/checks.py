"""System checks of the ``IDEMPOTASK`` setting (``manage.py check``).

========================  ==========================================================
``idempotask.E001``       ``IDEMPOTASK`` is not a dict
``idempotask.E002``       an unknown key (with the closest known one)
``idempotask.E003``       a key with a wrong value (the message says what is expected)
``idempotask.E004``       ``backend`` / ``dead_letter_store`` is neither a URL nor a
                          ``DATABASES`` alias
``idempotask.E005``       the alias is a database idempotask cannot store on
========================  ==========================================================
"""

from __future__ import annotations

from typing import Any

from django.core import checks  # type: ignore[import-untyped]

from idempotask.django.settings import read, validate

__all__ = ["check_settings"]


@checks.register()  # type: ignore[untyped-decorator]
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """One error per problem in ``IDEMPOTASK``."""
    _, problems = validate(read())
    return [
        checks.Error(problem.message, hint=problem.hint, obj="settings.IDEMPOTASK", id=problem.id)
        for problem in problems
    ]
