"""``idempotask web``: serve the dashboard with uvicorn on the configured stores.

Bound to 127.0.0.1 by default. Any other address needs a token (``--token``, or
``$IDEMPOTASK_WEB_TOKEN``, which keeps it out of the process list): the dashboard can
re-run payments, so it is never served to a network without authentication.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

__all__ = ["ENV_TOKEN", "is_loopback", "serve"]

ENV_TOKEN = "IDEMPOTASK_WEB_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only reaches this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def serve(ctx: Any) -> int:
    """Run the dashboard until interrupted (the ``web`` command's handler)."""
    from idempotask.cli._common import CommandError

    args = ctx.args
    token = args.token if args.token is not None else os.environ.get(ENV_TOKEN) or None
    if not is_loopback(args.host) and token is None:
        raise CommandError(
            f"--host {args.host}: the dashboard can act on your dead letters and keys, so "
            "outside this machine it needs authentication: pass --token (or set "
            f"${ENV_TOKEN}), or mount idempotask.web.create_app(auth=...) in your own app",
            2,
        )
    try:
        import uvicorn

        from idempotask.web import create_app
    except ImportError as exc:
        raise CommandError(
            f"the dashboard needs: pip install 'idempotask[web]' ({exc})", 1
        ) from exc
    app = create_app(
        token=token,
        read_only=args.read_only,
        show_arguments=not args.hide_arguments,
        refresh=args.refresh,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    mode = " (read-only)" if args.read_only else ""
    ctx.note(f"dashboard{mode} on http://{host}:{args.port}/ ; Ctrl-C stops it")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="debug" if args.debug else "warning",
        server_header=False,
        proxy_headers=False,  # client addresses are the sockets' own, never a header's
    )
    return 0
