"""The nodes of Arena AutoCache, over the daemon's control API: "Arena AutoCache" (per-workflow
overrides, read from the queued prompt by the feeder), "Arena AutoCache: Stats" and
"Arena AutoCache: Trim"."""

import json

from .arenafs_client import DaemonError

CATEGORY = "arena"
_client = None  # set by __init__ once the socket is known


def set_client(client):
    global _client
    _client = client


def _call(method, target, body=None):
    if _client is None:
        raise RuntimeError("arenafs: no daemon socket configured")
    try:
        return _client.call(method, target, body)
    except DaemonError as e:
        # A node that cannot reach the daemon says why in its output rather than failing the
        # whole prompt.
        return {"status": "error", "code": e.code, "message": e.message}


class ArenaAutoCache:
    """Overrides for the prompt it is in; it does nothing when executed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "use_workflow_overrides": ("BOOLEAN", {"default": False}),
                "override_discovery_mode": (["inherit", "workflow_only", "manual_only"],),
                "override_prefetch_strategy": (["inherit", "lazy", "prefetch_allowlist"],),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "noop"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def noop(self, **_):
        return ()


class _Report:
    """A node that asks the daemon and outputs what it says, as text and as JSON; it always runs
    (what the daemon says changes)."""

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("text", "json")
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    @staticmethod
    def report(text, answer):
        return {"ui": {"text": [text]}, "result": (text, json.dumps(answer, sort_keys=True))}


class ArenaAutoCacheStats(_Report):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    FUNCTION = "stats"

    def stats(self):
        answer = _call("GET", "/arena/stats")
        if answer.get("status") == "error":
            text = f"arenafs: {answer['code']}: {answer['message']}"
        else:
            keys = ["opens_passthrough", "opens_ssd", "opens_filling", "opens_nas", "bytes_from_ssd",
                    "bytes_from_nas", "bytes_fetched", "copies_completed", "evictions"]
            text = "\n".join(f"{k}: {answer.get(k)}" for k in keys if k in answer)
        return self.report(text, answer)


class ArenaAutoCacheTrim(_Report):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "criterion": (["to_gb", "older_than_days", "category", "file"],),
                "value": ("STRING", {"default": ""}),
                "dry_run": ("BOOLEAN", {"default": True}),
            }
        }

    FUNCTION = "trim"

    def trim(self, criterion, value, dry_run):
        body = {"dry_run": bool(dry_run)}
        try:
            if criterion == "to_gb":
                body["to_bytes"] = int(float(value) * 1e9)
            elif criterion == "older_than_days":
                body["older_than_secs"] = int(float(value) * 86400)
            else:
                body[criterion] = value
        except ValueError:
            text = f"arenafs: {criterion} needs a number, not {value!r}"
            return self.report(text, {"status": "error"})
        answer = _call("POST", "/arena/trim", body)
        if answer.get("status") == "error":
            text = f"arenafs: {answer['code']}: {answer['message']}"
        else:
            verb = "would remove" if dry_run else "removed"
            removed = answer.get("removed") or []
            lines = [f"{verb} {len(removed)} copies, {answer.get('freed_bytes', 0)} bytes"]
            lines += [f"  {r.get('path')}" for r in removed]
            text = "\n".join(lines)
        return self.report(text, answer)


NODE_CLASS_MAPPINGS = {
    "ArenaAutoCache": ArenaAutoCache,
    "ArenaAutoCacheStats": ArenaAutoCacheStats,
    "ArenaAutoCacheTrim": ArenaAutoCacheTrim,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ArenaAutoCache": "Arena AutoCache",
    "ArenaAutoCacheStats": "Arena AutoCache: Stats",
    "ArenaAutoCacheTrim": "Arena AutoCache: Trim",
}
