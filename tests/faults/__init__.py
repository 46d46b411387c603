"""Fault tests: real servers killed, connections dropped, workers SIGKILLed, slow stores.

Each test names the guarantee (DESIGN §3.6, §5; README "The guarantee, and where it
ends") it checks. Helpers: ``_support`` (worker processes, counters, the audit),
``_proxy`` (a TCP proxy that delays or blackholes traffic).
"""
