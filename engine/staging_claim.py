"""Which plan a staging directory belongs to, checked by every writer before a shard lands there.

``prepare_staging`` writes ``staging.json`` naming the plan digest (recipe + input fingerprints + shard
layout). A worker computing a shard for plan *D* writes it under a temporary name carrying *D* and, just
before renaming it into place, checks that the staging directory still claims *D*. So a worker orphaned by a
killed driver cannot drop its shard into a staging directory that was deleted and recreated for another
recipe in the meantime, nor recreate a deleted or committed one. Records carry *D* too, and resume and
commit accept only records of their own plan (:mod:`omnimerge.engine.commit`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ResumeError

__all__ = ["STAGING_STATE", "staging_claim", "check_staging_claim", "temp_shard_name"]

STAGING_STATE = "staging.json"


def staging_claim(staging: Path) -> str | None:
    """The plan digest ``staging`` belongs to, or ``None`` when it has no (readable) state file."""
    try:
        state = json.loads((Path(staging) / STAGING_STATE).read_text())
    except (OSError, ValueError):
        return None
    digest = state.get("plan_digest") if isinstance(state, dict) else None
    return digest if isinstance(digest, str) else None


def check_staging_claim(staging: Path, plan_digest: str, filename: str, label: str) -> None:
    """Raise :class:`ResumeError` unless ``staging`` still belongs to plan ``plan_digest``.

    Called before a shard computed for that plan is opened and again before it is renamed into place.
    """
    claim = staging_claim(staging)
    if claim == plan_digest:
        return
    now = (f"now belongs to another plan ({claim[:12]}…)" if claim
           else "no longer exists or holds no omnimerge staging state (deleted, or already committed)")
    raise ResumeError(
        f"Shard '{filename}' was computed for plan {plan_digest[:12]}… (recipe {label}), but staging '{staging}' "
        f"{now}; the shard was discarded, not written. This happens when a worker of an interrupted run outlives "
        "its driver; the current run computes its own shards, so nothing needs doing.")


def temp_shard_name(filename: str, plan_digest: str, token: str) -> str:
    """The temporary name a shard is written under before its rename: hidden, tagged with its plan."""
    tag = f".{plan_digest[:12]}" if plan_digest else ""
    return f".{filename}{tag}.{token}.tmp"
