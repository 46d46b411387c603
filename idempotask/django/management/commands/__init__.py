"""``manage.py idempotask``."""
