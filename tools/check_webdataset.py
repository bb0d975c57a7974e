"""Checks pool shards against the `webdataset` package, both ways, and records the result as
fixtures for tests/webdataset.rs:

- reads tests/fixtures/webdataset/ours/*.tar (written by this project; regenerate them with
  `STABLEREP_UPDATE_FIXTURES=1 cargo test --test webdataset python_webdataset`) with
  `webdataset.WebDataset` and records every sample's key, fields and bytes in
  tests/fixtures/webdataset/python_read.json;
- writes the same samples with webdataset's own `TarWriter` to
  tests/fixtures/webdataset/python/pool-000000.tar, for our reader.

    python3 -m venv .venv-ref && .venv-ref/bin/pip install webdataset
    .venv-ref/bin/python tools/check_webdataset.py
"""

import glob
import json
import os

import webdataset as wds

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "webdataset")


def main():
    shards = sorted(glob.glob(os.path.join(ROOT, "ours", "pool-*.tar")))
    assert shards, "no shards in tests/fixtures/webdataset/ours"
    samples = []
    for s in wds.WebDataset(shards, shardshuffle=False):
        fields = {k: v.hex() for k, v in sorted(s.items()) if not k.startswith("__")}
        samples.append({"key": s["__key__"], "fields": fields})
    out = {
        "webdataset": getattr(wds, "__version__", "unknown"),
        "shards": [os.path.basename(p) for p in shards],
        "samples": samples,
    }
    with open(os.path.join(ROOT, "python_read.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.makedirs(os.path.join(ROOT, "python"), exist_ok=True)
    with wds.TarWriter(os.path.join(ROOT, "python", "pool-000000.tar")) as w:
        for s in samples:
            sample = {"__key__": s["key"]}
            sample.update({k: bytes.fromhex(v) for k, v in s["fields"].items()})
            w.write(sample)
    print(f"{len(samples)} samples from {len(shards)} shards")


if __name__ == "__main__":
    main()
