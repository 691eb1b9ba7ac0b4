"""Feeds the daemon the models of every queued prompt, in the background.

`on_prompt` (registered with PromptServer.add_on_prompt_handler) only puts the prompt on a queue
and returns it unchanged: queueing is never delayed or broken. One thread sends the prompts in
order to `POST /arena/workflow?action=prefetch&client_id=<this instance>`, so that the models they
load start copying before their loader nodes run. A prompt refused for the cooldown is sent again
after `retry_after_ms`; one refused because this instance's previous set still copies is sent when
that set is done (ComfyUI runs prompts one after another, so the next one waits anyway). A missing
daemon, `BUDGET_EXCEEDED` and other refusals are reported (log, status), never raised.
"""

import json
import logging
import queue
import threading
import time
import urllib.parse

from .arenafs_client import DaemonError

log = logging.getLogger("arenafs")

OVERRIDE_CLASS = "ArenaAutoCache"
# How long a prompt waits for this instance's previous set to finish before it is dropped.
MAX_WAIT_SECS = 6 * 3600
POLL_SECS = 1.0


def override_of(prompt):
    """The overrides of an enabled "Arena AutoCache" node in an API prompt, or {}."""
    for node in (prompt or {}).values():
        if not isinstance(node, dict) or node.get("class_type") != OVERRIDE_CLASS:
            continue
        inputs = node.get("inputs") or {}
        if inputs.get("use_workflow_overrides") is True:
            return {
                "discovery": inputs.get("override_discovery_mode", "inherit"),
                "prefetch": inputs.get("override_prefetch_strategy", "inherit"),
            }
    return {}


class Feeder:
    def __init__(self, client, client_id):
        self.client = client
        self.client_id = client_id
        self.queue = queue.Queue()
        self.lock = threading.Lock()
        self.events = []  # the last events, newest last (shown by /arenafs/status)
        self.pending = 0
        self.listeners = []  # callables(event dict), e.g. a websocket push
        self.thread = threading.Thread(target=self._run, name="arenafs-feed", daemon=True)
        self.thread.start()

    # Called by ComfyUI on the server's event loop: must return at once.
    def on_prompt(self, json_data):
        try:
            prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
            if isinstance(prompt, dict):
                # A snapshot: ComfyUI's executor writes into the prompt's nodes later (their
                # `is_changed`, NaN for nodes that always run), possibly while it is being sent.
                snapshot = json.loads(json.dumps(prompt))
                with self.lock:
                    self.pending += 1
                self.queue.put(snapshot)
        except Exception:  # never break queueing
            log.exception("arenafs: could not look at a queued prompt")
        return json_data

    def pending_prompts(self):
        """Prompts queued but not yet sent, refused or given up."""
        with self.lock:
            return self.pending

    def _event(self, kind, **fields):
        ev = {"kind": kind, "time": time.time(), **fields}
        with self.lock:
            self.events = (self.events + [ev])[-50:]
        level = logging.INFO if kind in ("sent", "skipped") else logging.WARNING
        log.log(level, "arenafs: %s %s", kind, json.dumps(fields))
        for listen in list(self.listeners):
            try:
                listen(ev)
            except Exception:
                pass

    def recent(self):
        with self.lock:
            return list(self.events)

    def _discovery(self):
        return self.client.get("/arena/status").get("discovery_mode", "workflow_only")

    def _run(self):
        while True:
            prompt = self.queue.get()
            try:
                self._feed(prompt)
            except Exception as e:  # a bug here must not stop the feeder
                log.exception("arenafs: feeding a prompt failed")
                self._event("error", code="INTERNAL", message=str(e))
            finally:
                with self.lock:
                    self.pending -= 1

    def _feed(self, prompt):
        override = override_of(prompt)
        try:
            discovery = override.get("discovery", "inherit")
            if discovery == "inherit":
                discovery = self._discovery()
            if discovery == "manual_only":
                self._event("skipped", reason="discovery is manual_only")
                return
            query = {"action": "prefetch", "client_id": self.client_id}
            strategy = override.get("prefetch", "inherit")
            if strategy in ("lazy", "prefetch_allowlist"):
                # The override applies to this prompt's copies only: with the allow-list, its
                # files join the prompt's models in this instance's required set.
                query["prefetch_strategy"] = strategy
            target = "/arena/workflow?" + urllib.parse.urlencode(query)
            started = time.monotonic()
            while True:
                try:
                    answer = self.client.post(target, {"prompt": prompt})
                    self._event(
                        "sent",
                        queued=answer.get("queued", 0),
                        bytes_to_fetch=answer.get("bytes_to_fetch", 0),
                        allowlist=answer.get("allowlist", 0),
                        models=[m.get("nas_path") or m.get("path") for m in answer.get("models", []) if m.get("status") == "exec"],
                    )
                    return
                except DaemonError as e:
                    if time.monotonic() - started > MAX_WAIT_SECS:
                        raise
                    if e.code == "COOLDOWN_ACTIVE":
                        wait = e.body.get("retry_after_ms", 1000) / 1000.0
                        self._event("retry", code=e.code, after_secs=wait)
                        time.sleep(min(max(wait, 0.05), 60))
                        continue
                    if e.code == "ALREADY_RUNNING":
                        time.sleep(POLL_SECS)
                        continue
                    if e.code == "EMPTY_REQUIRED_SET":
                        self._event("skipped", reason="the prompt loads no model files")
                        return
                    raise
        except DaemonError as e:
            self._event("error", code=e.code, message=e.message)
