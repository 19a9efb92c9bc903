"""``farm storage``: check the configured object store."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import typer

from farm.cli.common import console, settings
from storage.objects import join_key, open_store

app = typer.Typer(help="Inspect and check the object store (local folder or S3).", no_args_is_help=True)


@app.command()
def check() -> None:
    """Write, read back, list, presign and delete a small object in the configured store."""

    cfg = settings()
    store = open_store(cfg.storage, cfg.data_dir)
    payload = json.dumps({"check": "farm storage round trip", "at": time.time()}).encode()
    key = join_key("farm-check", f"{uuid.uuid4().hex}.json")
    started = time.perf_counter()
    info = store.put_bytes(key, payload, content_type="application/json")
    data = store.get_bytes(key)
    listed = [obj.key for obj in store.list(join_key("farm-check"))]
    url = store.url(key)
    store.delete(key)
    elapsed = time.perf_counter() - started
    expected = hashlib.sha256(payload).hexdigest()
    ok = data == payload and key in listed and not store.exists(key) and info.size == len(payload)
    console.print(f"store:   {store.describe()}")
    console.print(f"object:  {key} ({len(payload)} bytes, sha256 {expected[:16]}...)")
    console.print(f"url:     {url.split('?')[0]}")
    console.print(f"result:  {'ok' if ok else 'MISMATCH'} in {elapsed * 1000:.1f} ms")
    if not ok:
        raise typer.Exit(1)
