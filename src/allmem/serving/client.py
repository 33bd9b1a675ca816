"""A server under check: start an OpenAI-compatible server command in its own process group,
wait until ``/health`` answers, post JSON to it, send completions concurrently, and stop it
with every child (vLLM's engine runs in subprocesses). Used by the serving benchmark and
the server test; nothing here imports vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def _json(raw: bytes) -> dict[str, Any]:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:  # e.g. a plain-text error page
        return {}


class ServerProcess:
    """``with ServerProcess(cmd, log_path, port=...) as server: server.wait_ready(); server.call(...)``"""

    def __init__(self, cmd: list[str], log_path: str | os.PathLike, *, port: int, host: str = "127.0.0.1",
                 stop_timeout: float = 60.0, env: dict[str, str] | None = None):
        self.cmd, self.log_path, self.stop_timeout, self.env = cmd, Path(log_path), stop_timeout, env
        self.base = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self._log = self.log_path.open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Seconds from start until ``/health`` answered 200; raises if the server exits first
        (with the end of its log) or is not ready within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; the end of {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout:.0f} s; see {self.log_path}")
            try:
                if urllib.request.urlopen(self.base + "/health", timeout=5).status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                time.sleep(2)

    def call(self, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of a GET (no body) or a JSON POST; error statuses are returned."""
        request = urllib.request.Request(self.base + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read())

    def complete_concurrently(self, model: str, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, dict]]:
        """Greedy ``/v1/completions`` of token-id prompts, all at once (one thread each), with the
        generated token ids in the answers."""
        results: list = [None] * len(prompts)

        def complete(i: int) -> None:
            body = json.dumps({"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0.0,
                               "ignore_eos": True, "return_token_ids": True}).encode()
            results[i] = self.call("/v1/completions", body)

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results
