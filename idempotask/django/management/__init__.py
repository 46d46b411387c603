"""Management commands of the ``idempotask.django`` app."""
