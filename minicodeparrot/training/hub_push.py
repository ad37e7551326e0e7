"""Push checkpoints to the Hub beside training: the loop hands a folder over and goes on at once.

`HubPusher.push(step, folder)` copies the folder (training will overwrite those files at the next save)
and a worker thread uploads the copy as one commit, "step N" (sources/upload.py). Three rules:
- the loop never waits for the network, and nothing the upload does can raise into training;
- the newest state wins: a save that arrives while the previous upload is still running replaces the
  one waiting behind it (there is no point uploading a model that a newer one supersedes), and a
  push that failed is folded into the next save's. The commit message then names every step it
  covers ("step 300 (also covers step 100, 200)"), so the repo history shows where they went;
- nothing is lost silently: every failure is logged with its reason, and `close()` makes the final
  push (with a few more tries). If even that fails, the snapshot stays on disk and the log says how
  to push it by hand (`minicodeparrot upload DIR owner/name`).
Only rank 0 makes a pusher: the upload is of files rank 0 wrote, and one commit per save is wanted.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from minicodeparrot.sources.upload import upload_folder

log = logging.getLogger("minicodeparrot.training.hub_push")


def commit_message(steps: list[int]) -> str:
    message = f"step {steps[-1]}"
    if len(steps) > 1:
        message += f" (also covers step {', '.join(map(str, steps[:-1]))})"
    return message


class HubPusher:
    """Background uploads of checkpoint folders to one Hub model repo (see the module docstring).

    Use: `pusher = HubPusher("owner/name", output_dir / "hub-push", private)` once; after each save
    `pusher.push(step, folder)` (folder: config.json, model.safetensors, tokenizer files, metrics.jsonl);
    at the end of the run `pusher.close()`, which returns the steps that could not be pushed."""

    def __init__(self, repo_id: str, staging_dir: str | Path, private: bool = False, final_tries: int = 3):
        self.repo_id, self.private, self.final_tries = repo_id, private, final_tries
        self.staging_dir = Path(staging_dir)
        self.pushed: list[int] = []  # steps whose state is on the Hub (in their own commit or a later one)
        self.commits: list[str] = []  # the commit messages made, in order
        self._cond = threading.Condition()
        self._waiting: tuple[list[int], Path] | None = None  # the newest snapshot, not yet being uploaded
        self._failed: tuple[list[int], Path] | None = None  # the last failed push, retried at the next one
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
        self._thread.start()

    def push(self, step: int, folder: str | Path) -> None:
        """Queue `folder` as the state at `step`; returns once the folder is copied."""
        if self._closing:  # the worker is gone: this state would wait forever without a word
            log.error("hub push: step %d handed over after close(); it is not pushed", step)
            return
        try:
            snapshot = self.staging_dir / f"step_{step}"
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(folder, snapshot)
        except OSError as e:  # a full disk must not end the run: this save is simply not pushed
            log.error("hub push: cannot copy %s for step %d (%s); that save is not pushed", folder, step, e)
            return
        with self._cond:
            steps = []
            for older in (self._failed, self._waiting):  # superseded: their steps ride on this push
                if older is not None:
                    steps += older[0]
                    shutil.rmtree(older[1], ignore_errors=True)
            self._failed = None
            self._waiting = (sorted(steps + [step]), snapshot)
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closing:
                    self._cond.wait()
                if self._waiting is None:
                    return
                steps, snapshot = self._waiting
                self._waiting = None
            self._upload(steps, snapshot)

    def _upload(self, steps: list[int], snapshot: Path) -> bool:
        message = commit_message(steps)
        try:
            upload_folder(snapshot, self.repo_id, message, private=self.private)
        except Exception as e:  # noqa: BLE001 - whatever happens in an upload, training goes on
            log.warning("hub push of %s to %s failed (%s: %s); retried with the next save",
                        message, self.repo_id, type(e).__name__, e)
            with self._cond:
                if self._waiting is None:
                    self._failed = (steps, snapshot)
                else:  # a newer save arrived meanwhile: it carries these steps
                    newer, newer_snapshot = self._waiting
                    self._waiting = (sorted(steps + newer), newer_snapshot)
                    shutil.rmtree(snapshot, ignore_errors=True)
            return False
        log.info("pushed %s to %s", message, self.repo_id)
        self.pushed += steps
        self.commits.append(message)
        shutil.rmtree(snapshot, ignore_errors=True)
        return True

    def close(self) -> list[int]:
        """Wait for the uploads, retry a failed last one (`final_tries` times); the steps not pushed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        for _ in range(self.final_tries):
            if self._failed is None:
                break
            steps, snapshot = self._failed
            self._failed = None
            self._upload(steps, snapshot)
        if self._failed is None:
            return []
        steps, snapshot = self._failed
        log.error("hub push: %s never reached %s; its files are kept in %s: push them with "
                  "`minicodeparrot upload %s %s`", commit_message(steps), self.repo_id, snapshot, snapshot,
                  self.repo_id)
        return steps
