"""RQ's settings module for the plain RQ way, from streamq's own settings::

    STREAMQ_MODEL=/models/qwen rq worker -w worker.rq_worker.StreamqWorker -c worker.rq_config
    rq info -c worker.rq_config

RQ's command line finds its Redis in a settings module's names: ``REDIS_URL``, or ``SENTINEL``
for a primary that Redis Sentinel manages. This module sets them from ``STREAMQ_REDIS_URL``, or
``STREAMQ_REDIS_SENTINELS`` and ``STREAMQ_REDIS_SENTINEL_MASTER`` (the URL's user, password,
database and TLS then go to the primary, ``STREAMQ_REDIS_SENTINEL_PASSWORD`` to the sentinels),
so that RQ's own loop asks the sentinels for the primary, as ``streamq worker`` does.

RQ's loop ends at a Redis error it meets outside its wait for a job (RQ's rule: marking the
worker idle after a job, its heartbeat), which a failover can make: run it under a supervisor
that starts it again (systemd's ``Restart=always``, Kubernetes' restart policy). Started again
with this module, it finds the new primary; with ``-u`` and the old primary's address, it would
go back to that server, a replica by then, or gone. (``streamq worker`` rides out a failover by
itself.)

RQ reads a settings module's names when it imports it: they are computed then, once (RQ's
interface is a module of constants).
"""

from __future__ import annotations

from typing import Any

from shared.redis_connect import RedisTarget
from shared.settings_loading import load_settings


def rq_redis_settings(target: RedisTarget) -> dict[str, Any]:
    """The names RQ's ``get_redis_from_config`` reads for ``target``."""
    if not target.managed:
        return {"REDIS_URL": target.url}
    options = target.primary_options()
    return {
        "SENTINEL": {
            "INSTANCES": list(target.sentinels),
            "MASTER_NAME": target.master,
            "CONNECTION_KWARGS": options,
            "SENTINEL_KWARGS": target.sentinel_options(options),
        }
    }


globals().update(rq_redis_settings(RedisTarget.of(load_settings())))
