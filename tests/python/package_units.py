"""Checks the ComfyUI package's helpers without ComfyUI (tests/it/comfyui.rs runs it with the
test venv's python): the badge's progress and update summary, the override node's reading, the
feeder's snapshot of a queued prompt, and the idle poller's change detection. Prints OK."""

import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import comfyui.arenafs_feed as feed  # noqa: E402
import comfyui.arenafs_progress as progress  # noqa: E402

status = {
    "cache_state": "red",
    "offline": False,
    "jobs": [{"path": "loras/a", "state": "running", "total_bytes": 10, "done_bytes": 5,
              "rate_bytes_per_sec": 1.0, "eta_secs": 5.0, "reason": "required"}],
    "update": {"running": {"kind": "apply", "models": [
        {"id": "base", "state": "downloading", "done_bytes": 5, "total_bytes": 10, "x": 1}]},
        "available": ["lora"]},
}
p = progress.progress_of(status)
assert p["update"] == {"running": "apply", "available": ["lora"], "models": [
    {"id": "base", "state": "downloading", "done_bytes": 5, "total_bytes": 10}]}, p
assert p["jobs"][0] == {"path": "loras/a", "state": "running", "total_bytes": 10, "done_bytes": 5,
                        "rate_bytes_per_sec": 1.0, "eta_secs": 5.0}, p
assert progress.progress_of({"jobs": []})["update"] is None

# The override node: only when enabled.
prompt = {"1": {"class_type": "ArenaAutoCache", "inputs": {
    "use_workflow_overrides": True, "override_discovery_mode": "inherit",
    "override_prefetch_strategy": "prefetch_allowlist"}}}
assert feed.override_of(prompt) == {"discovery": "inherit", "prefetch": "prefetch_allowlist"}
prompt["1"]["inputs"]["use_workflow_overrides"] = False
assert feed.override_of(prompt) == {}


# The feeder snapshots a queued prompt: what ComfyUI writes into it later is not sent.
class Client:
    def __init__(self):
        self.sent = []
        self.gate = threading.Event()

    def get(self, target):
        self.gate.wait(10)
        return {"discovery_mode": "workflow_only"}

    def post(self, target, body):
        self.sent.append((target, json.dumps(body, allow_nan=False)))
        return {"queued": 1, "models": []}


c = Client()
f = feed.Feeder(c, "comfyui:test:1")
queued = {"prompt": {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x"}}}}
f.on_prompt(queued)
assert f.pending_prompts() == 1
queued["prompt"]["1"]["is_changed"] = float("nan")  # what ComfyUI's executor does
c.gate.set()
for _ in range(200):
    if f.pending_prompts() == 0:
        break
    threading.Event().wait(0.05)
assert f.pending_prompts() == 0 and len(c.sent) == 1, (f.pending_prompts(), c.sent)
assert "is_changed" not in c.sent[0][1] and "client_id=comfyui%3Atest%3A1" in c.sent[0][0], c.sent


# The poller: between copies, an event only when something the badge shows changed.
class Daemon:
    def __init__(self):
        self.status = {"cache_state": "red", "offline": False, "jobs": []}
        self.looks = 0

    def get(self, target):
        with seen:
            self.looks += 1
            seen.notify_all()
        return dict(self.status)


events = []
seen = threading.Condition()
d = Daemon()


def send(name, data):
    with seen:
        events.append((name, data))
        seen.notify_all()


progress.IDLE_SECS = 0.05
pr = progress.Progress(d, send)


def wait_events(n):
    with seen:
        assert seen.wait_for(lambda: len(events) >= n, 10), events


wait_events(1)  # the first look says how things are
with seen:  # ten more looks with nothing changed: nothing sent
    looks = d.looks
    assert seen.wait_for(lambda: d.looks >= looks + 10, 10)
    assert len(events) == 1, events
d.status = {"cache_state": "red", "offline": True, "jobs": []}
wait_events(2)
assert events[1][1]["offline"] is True, events
d.status = {"cache_state": "red", "offline": True, "jobs": [],
            "update": {"running": {"kind": "check", "models": []}, "available": []}}
wait_events(3)
assert events[2][1]["update"]["running"] == "check", events
print("OK")
