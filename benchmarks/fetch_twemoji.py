"""Fetch Twemoji at 64 px: a design family the embedded VAE never saw, for ``bench_vae.py --other_family``.

    python benchmarks/fetch_twemoji.py                      # -> ~/.cache/crispdiff/twemoji-64 (3,786 RGBA PNGs)
    python benchmarks/bench_vae.py --other_family ~/.cache/crispdiff/twemoji-64

Issue 8 asks that the embedded VAE generalise to emoji of another design family (>= 25 dB, hf ratio >= 0.85).
``../shared`` has only Noto; the same emoji drawn by Twitter come from the npm registry as
``emoji-datasource-twitter`` (the package ``emoji-datasource-google`` that the Noto set was cut from has the same
layout). Nothing is committed: the images are CC-BY 4.0 (Twitter, Inc. and contributors, https://twemoji.twitter.com),
fetched once into a cache. Tests never need this; bench_vae.py measures the family only when given the folder.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import shutil
import tarfile
import urllib.request
from pathlib import Path

from crispdiff.core.io import staging_folder, swap_folder_into_place

PACKAGE = "emoji-datasource-twitter"
VERSION = "16.0.0"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
MEMBER_PREFIX = "package/img/twitter/64/"
DEFAULT_OUT = Path.home() / ".cache" / "crispdiff" / "twemoji-64"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (replaced atomically)")
    p.add_argument("--tarball", help="a local copy of the .tgz instead of downloading it")
    return p.parse_args()


def registry_integrity() -> str:
    """The registry's own sha512 for this version (``dist.integrity``): a truncated or altered download is refused."""
    with urllib.request.urlopen(f"https://registry.npmjs.org/{PACKAGE}/{VERSION}", timeout=60) as response:
        return json.load(response)["dist"]["integrity"]


def read_tarball(args: argparse.Namespace) -> bytes:
    if args.tarball:
        return Path(args.tarball).read_bytes()
    print(f"downloading {TARBALL} (about 60 MB)")
    with urllib.request.urlopen(TARBALL, timeout=600) as response:
        payload = response.read()
    expected = registry_integrity()
    actual = "sha512-" + base64.b64encode(hashlib.sha512(payload).digest()).decode()
    if actual != expected:
        raise SystemExit(f"{TARBALL}: checksum {actual[:24]}... does not match the registry's {expected[:24]}...")
    return payload


def main() -> None:
    args = parse_args()
    payload = read_tarball(args)
    staging = staging_folder(args.out)
    staging.mkdir(parents=True)
    count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:
            for member in archive.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(MEMBER_PREFIX) and name.endswith(".png")):
                    continue
                target = staging / Path(name).name  # flat: no path from the archive is trusted
                with archive.extractfile(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                count += 1
        if count == 0:
            raise SystemExit(f"{TARBALL}: no PNGs under {MEMBER_PREFIX}; has the package layout changed?")
        swap_folder_into_place(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{count} Twemoji PNGs (64 px, RGBA) in {args.out}")


if __name__ == "__main__":
    main()
