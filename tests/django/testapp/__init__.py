"""A small app whose model the transactional tests write with the ORM."""
