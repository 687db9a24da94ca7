"""GRPO's rollouts on a separate server (``--rollout-server URL``): a ``loralab serve``
or a vLLM, which is how users scale the sampling out.

Each step, the adapter as it is now is written in PEFT's files (replaced together) into
``--rollout-dir`` and loaded on the server under one name with ``load_inplace`` (vLLM's
route and body), so the server samples with the weights that train. Then every rollout
row is one ``/v1/completions`` request: the prompt's token ids, the row's own seed, the
stop tokens (vLLM's ``stop_token_ids``) and vLLM's ``return_token_ids``, so that each
completion comes back as the tokens that were sampled and nothing is tokenized again.
The rows' requests go out together, and the server batches them. A ``loralab serve``
draws as loralab's engine does (the row's seed, its uniform number on the nucleus), so
the rows it samples are the ones the engine here would sample (the test checks it token
for token); a resumed run samples what the first one did wherever the server's sums of
the same numbers round alike.

The server must read the folder at the path the trainer writes it (one machine, or a
shared file system mounted at the same path): ``loralab serve --adapter-dir`` a folder
that holds it; vLLM with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from torch import nn

from ...lora.config import ConfigError
from .grpo_step import Sampling

API_KEY_VARIABLE = "LORALAB_ROLLOUT_API_KEY"  # never in config.yaml: an environment variable
REQUEST_SECONDS = 600.0  # one completion of a few hundred tokens on a busy server
CHECK_SECONDS = 10.0
RETRIES = 3  # tries of a request the server did not answer (a restart, a full queue)
MAX_WORKERS = 64


class RolloutServerError(RuntimeError):
    """The rollout server could not be reached or refused a request (one line)."""


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL with a host."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"rollout_server must be an http:// or https:// URL of a server, got {url!r}"
        )
    return url.rstrip("/")


def adapter_name(run_dir: Path) -> str:
    """The name the run's adapter has on the server: one per run folder, so that runs
    sharing a server do not swap each other's weights."""
    return "grpo-" + re.sub(r"[^\w.-]", "-", Path(run_dir).resolve().name)[:100]


class RolloutServer:
    """Samples a GRPO step's rows on the server at ``url`` with the model's adapter."""

    def __init__(self, url: str, directory: Path, name: str, vocab_size: int | None = None) -> None:
        self.url = check_url(url)
        self.directory = Path(directory).resolve()
        self.name = name
        self.vocab_size = vocab_size  # the ids a completion may hold (set once loaded)
        self.api_key = os.environ.get(API_KEY_VARIABLE)
        self.loaded = False
        self.sync_seconds = 0.0  # the last step's write and load

    def check(self) -> None:
        """The server answers ``/v1/models`` (before the run loads its model)."""
        listing = self._request("GET", "/v1/models", None, CHECK_SECONDS, tries=1)
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise RolloutServerError(
                f"{self.url}/v1/models did not answer as an OpenAI-compatible server"
            )

    def __call__(
        self, model: nn.Module, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
    ) -> list[list[int]]:
        """One completion of each prompt (token ids, ending with its stop token), row
        ``i`` sampled with ``seeds[i]``, by the adapter as it is now."""
        started = time.perf_counter()
        self.publish(model)
        self.sync_seconds = time.perf_counter() - started
        workers = max(1, min(len(prompts), MAX_WORKERS))
        with concurrent.futures.ThreadPoolExecutor(workers, "loralab-rollout") as pool:
            rows = pool.map(
                lambda row: self._complete(prompts[row], sampling, seeds[row]),
                range(len(prompts)),
            )
            return list(rows)

    def publish(self, model: nn.Module) -> None:
        """Write the adapter and load it on the server in place of the previous step's."""
        from ...files.adapter_dir import save_adapter

        save_adapter(model, self.directory)  # a PiSSA adapter as a LoRA of the original base
        body = {"lora_name": self.name, "lora_path": str(self.directory), "load_inplace": True}
        self._request("POST", "/v1/load_lora_adapter", body, REQUEST_SECONDS)
        self.loaded = True

    def close(self) -> None:
        """Unload the run's adapter from the server (if it can be reached: a server that
        went away has nothing to unload)."""
        if not self.loaded:
            return
        self.loaded = False
        with contextlib.suppress(RolloutServerError):
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.name}, 30.0, 1)

    # -- one completion ------------------------------------------------------------------

    def _complete(self, prompt: list[int], sampling: Sampling, seed: int) -> list[int]:
        body = {
            "model": self.name,
            "prompt": prompt,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
            "n": 1,
            # the row ends at the step's stop tokens alone (the end of sequence among
            # them), as it does on loralab's engine
            "stop_token_ids": list(sampling.stop_ids),
            "ignore_eos": True,
            "return_token_ids": True,
        }
        answer = self._request("POST", "/v1/completions", body, REQUEST_SECONDS)
        try:
            ids = answer["choices"][0]["token_ids"]
        except (KeyError, IndexError, TypeError):
            ids = None
        if ids is None:
            raise RolloutServerError(
                f"{self.url}/v1/completions gave no token_ids: the rollout server must "
                "support vLLM's return_token_ids (loralab serve and vLLM ≥ 0.10.2 do)"
            )
        vocab = self.vocab_size if self.vocab_size is not None else float("inf")
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids
        ):
            raise RolloutServerError(
                f"{self.url}/v1/completions gave token_ids that are not ids of this model's "
                f"vocabulary (integers in [0, {self.vocab_size})): is it serving another base?"
            )
        return _cut(ids, sampling)

    # -- HTTP ----------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: dict | None, timeout: float, tries: int = RETRIES
    ):
        """The server's answer to one request (JSON, or the text of a plain answer);
        tried again after a pause where the server did not answer or was unavailable."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(tries):
            request = urllib.request.Request(self.url + path, data, headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    text = response.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code in (502, 503, 504) and attempt + 1 < tries:
                    time.sleep(attempt + 1)
                    continue
                raise RolloutServerError(
                    f"the rollout server refused {method} {path} ({error.code}): {message}"
                ) from None
            except (urllib.error.URLError, OSError) as error:
                if attempt + 1 < tries:
                    time.sleep(attempt + 1)
                    continue
                reason = getattr(error, "reason", error)
                raise RolloutServerError(
                    f"cannot reach the rollout server at {self.url} ({path}): {reason}"
                ) from None
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text
        raise AssertionError("unreachable")


def _cut(ids: list[int], sampling: Sampling) -> list[int]:
    """The completion up to its first stop token (kept), at most ``max_new_tokens``: what
    loralab's engine gives locally, whatever a server did with ``stop_token_ids``."""
    stops = set(sampling.stop_ids)
    for index, token in enumerate(ids):
        if token in stops:
            return ids[: index + 1]
    return ids[: sampling.max_new_tokens]


def _error_message(error: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body, else the body's first line."""
    try:
        text = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        return str(json.loads(text)["error"]["message"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return text.strip().splitlines()[0][:300] if text.strip() else str(error.reason)


__all__ = [
    "API_KEY_VARIABLE",
    "RolloutServer",
    "RolloutServerError",
    "adapter_name",
    "check_url",
]
