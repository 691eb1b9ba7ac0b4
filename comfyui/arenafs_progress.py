"""Copy progress for ComfyUI's front end, over its websocket (`send_sync`).

While copies run, the daemon's status is polled (every POLL_SECS) and each poll is sent as an
`arenafs.progress` event: the running and queued copies with bytes done, rate and ETA, the cache
state and whether the NAS is offline. When the last copy ends, one event with no jobs follows.
Between copies the status is looked at every IDLE_SECS, and an event goes out only when something
the badge shows changed: the daemon became (un)reachable, the NAS went offline or came back, the
cache state changed, an update of the model updater started, ended or became available, or
copies started (a prefetch from the CLI, say); copies and update runs start the fast polling
again. The feeder's events (a prompt sent, a refusal, the daemon not reachable) go out as
`arenafs.event`.
"""

import threading

from .arenafs_client import DaemonError

POLL_SECS = 0.5
IDLE_SECS = 5.0


def update_of(status):
    """The model updater's part (with a manifest configured in the daemon), or None."""
    up = status.get("update")
    if not isinstance(up, dict):
        return None
    running = up.get("running") or {}
    return {
        "running": running.get("kind"),
        "models": [{k: m.get(k) for k in ("id", "state", "done_bytes", "total_bytes")}
                   for m in running.get("models") or []],
        "available": up.get("available") or [],
    }


def progress_of(status):
    return {
        "update": update_of(status),
        "reachable": True,
        "cache_state": status.get("cache_state"),
        "offline": status.get("offline", False),
        "jobs": [
            {k: j.get(k) for k in ("path", "state", "total_bytes", "done_bytes", "rate_bytes_per_sec", "eta_secs")}
            for j in status.get("jobs", [])
        ],
    }


class Progress:
    def __init__(self, client, send):
        self.client = client
        self.send = send  # send(event_name, data)
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="arenafs-progress", daemon=True)
        self.thread.start()

    def on_feed_event(self, ev):
        self.send("arenafs.event", ev)
        if ev.get("kind") == "sent":
            self.wake.set()

    def _poll(self):
        try:
            return progress_of(self.client.get("/arena/status"))
        except DaemonError as e:
            return {"reachable": False, "error": e.code, "jobs": []}

    def _run(self):
        shown = None  # what the badge was last told: (reachable, offline, cache state)
        while True:
            fed = self.wake.wait(IDLE_SECS)
            self.wake.clear()
            while True:
                data = self._poll()
                up = data.get("update") or {}
                now = (data["reachable"], data.get("offline"), data.get("cache_state"),
                       up.get("running"), tuple(up.get("available") or ()))
                busy = bool(data["jobs"]) or bool(up.get("running"))
                if fed or busy or now != shown:
                    self.send("arenafs.progress", data)
                    shown = now
                if not busy:
                    break
                # A new prompt while copies run just keeps the polling going.
                self.wake.wait(POLL_SECS)
                self.wake.clear()
                # The event after the last copy goes out even when nothing else changed.
                fed = True
