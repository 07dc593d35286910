"""Image sources: an OCI image layout (a directory, ``DIR:TAG``) and a ``docker save`` / docker-archive tar.

Layer: driver. May import: thinpool.errors.

Both give :class:`ImageSpec` records: the config blob (its sha256 is the image id), the layer blobs in order
(bottom first, each opened on demand, compressed or not) and the references to tag it with. The OCI layout is
``oci-layout`` + ``index.json`` (the tag in ``org.opencontainers.image.ref.name``) + ``blobs/<alg>/<hex>``; a
docker archive has ``manifest.json`` (``[{"Config", "RepoTags", "Layers"}]``), or, as docker v25+ and skopeo's
``oci-archive`` write, an OCI layout inside the tar.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from thinpool.errors import ImageFormatError

MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


@dataclass
class LayerBlob:
    """One layer: ``open()`` gives a fresh seekable reader of the blob; ``digest`` of the blob if known."""

    name: str
    open: Callable[[], IO[bytes]]
    digest: str | None = None
    media_type: str = ""


@dataclass
class ImageSpec:
    config: bytes
    layers: list[LayerBlob]
    refs: list[str] = field(default_factory=list)


def normalize_ref(ref: str) -> str:
    """The familiar form docker prints: ``NAME`` -> ``NAME:latest``, ``docker.io/library/NAME:T`` -> ``NAME:T``,
    ``docker.io/U/NAME:T`` -> ``U/NAME:T``; a digest reference (``@sha256:``) keeps its digest."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"):
        if ref.startswith(prefix) and ref.count("/") - prefix.count("/") <= (0 if "library" in prefix else 1):
            ref = ref[len(prefix):]
            break
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else ref + ":latest"


class _Files:
    """Read files of a directory or of a tar archive by relative name."""

    def __init__(self, where: str, opener: Callable[[str], IO[bytes]], names: Callable[[], set[str]]) -> None:
        self.where = where
        self._open = opener
        self._names = names

    def bad(self, reason: str) -> ImageFormatError:
        return ImageFormatError(source=self.where, reason=reason)

    def exists(self, name: str) -> bool:
        return os.path.normpath(name) in self._names()

    def open(self, name: str) -> IO[bytes]:
        try:
            return self._open(os.path.normpath(name))
        except (KeyError, FileNotFoundError):
            raise self.bad(f"missing {name}") from None

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self.bad(f"{name} is not JSON ({e})") from None


def _dir_files(d: Path) -> _Files:
    cache: set[str] = set()

    def names() -> set[str]:
        if not cache:
            cache.update(os.path.normpath(str(p.relative_to(d))) for p in d.rglob("*"))
        return cache

    def opener(name: str) -> IO[bytes]:
        if name.startswith("/") or name == ".." or name.startswith("../"):
            raise KeyError(name)  # names come from the image's JSON: never outside the layout
        try:
            return open(d / name, "rb")
        except IsADirectoryError:
            raise KeyError(name) from None

    return _Files(str(d), opener, names)


def _tar_files(tf: tarfile.TarFile, where: str) -> _Files:
    members = {os.path.normpath(m.name): m for m in tf.getmembers()}

    def opener(name: str) -> IO[bytes]:
        m = members[name]
        hops = 0
        while m.islnk() or m.issym():
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise KeyError(name)  # a link loop in the archive
            name = os.path.normpath(m.linkname if m.islnk() else os.path.join(os.path.dirname(name), m.linkname))
            m = members[name]
        f = tf.extractfile(m)
        if f is None:
            raise KeyError(name)
        return f

    return _Files(where, opener, lambda: set(members))


MAX_LINK_HOPS = 40
MAX_INDEX_DEPTH = 8  # an index of indexes ... (a hostile one could loop)
# the OCI descriptor grammar: algorithm ":" encoded
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def _blob_name(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ImageFormatError(source=repr(digest)[:80], reason="bad digest")
    alg, _, hexd = digest.partition(":")
    return f"blobs/{alg}/{hexd}"


def _obj(files: _Files, value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise files.bad(f"{what} is not a JSON object")
    return value


def _list(files: _Files, value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise files.bad(f"{what} is not a JSON list")
    return value


def _oci_images(files: _Files, tag: str | None, default_name: str) -> list[ImageSpec]:
    if not files.exists("index.json"):
        raise files.bad("no index.json")
    specs: list[ImageSpec] = []
    found_tag = False

    def visit(desc: dict[str, Any], ref_name: str | None, depth: int = 0) -> None:
        nonlocal found_tag
        desc = _obj(files, desc, "a descriptor")
        mt = desc.get("mediaType", "")
        ann = _obj(files, desc.get("annotations") or {}, "annotations")
        ref_name = ann.get(REF_NAME, ref_name)
        full = ann.get(CONTAINERD_NAME)
        if not isinstance(ref_name, str | None) or not isinstance(full, str | None):
            raise files.bad("an image name annotation is not a string")
        if mt in INDEX_TYPES:
            if depth >= MAX_INDEX_DEPTH:
                raise files.bad(f"image indexes nested deeper than {MAX_INDEX_DEPTH}")
            sub = _obj(files, files.json(_blob_name(desc.get("digest"))), "an image index")
            for d in _for_this_platform(_list(files, sub.get("manifests"), "manifests")):
                visit(d, ref_name, depth + 1)
            return
        if mt and mt not in MANIFEST_TYPES:
            return
        if tag is not None and ref_name != tag:
            return
        found_tag = found_tag or tag is not None
        m = _obj(files, files.json(_blob_name(desc.get("digest"))), "a manifest")
        config = files.read(_blob_name(_obj(files, m.get("config"), "the manifest's config").get("digest")))
        layers = []
        for ld in _list(files, m.get("layers"), "the manifest's layers"):
            ld = _obj(files, ld, "a layer descriptor")
            name = _blob_name(ld.get("digest"))
            layers.append(LayerBlob(name, _opener(files, name), ld["digest"], str(ld.get("mediaType", ""))))
        refs = []
        if full:
            refs.append(normalize_ref(full))
        elif ref_name:
            refs.append(normalize_ref(ref_name) if (":" in ref_name or "/" in ref_name)
                        else f"{default_name}:{ref_name}")
        specs.append(ImageSpec(config, layers, refs))

    index = _obj(files, files.json("index.json"), "index.json")
    for d in _for_this_platform(_list(files, index.get("manifests"), "index.json's manifests")):
        visit(d, None)
    if tag is not None and not found_tag:
        raise files.bad(f"no image tagged {tag!r} in index.json")
    return specs


_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


def _for_this_platform(descs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A multi-platform index: only the linux manifest of this machine's architecture (as docker pulls one);
    descriptors without a platform are all kept."""
    with_platform = [d for d in descs if isinstance(d, dict) and isinstance(d.get("platform"), dict)]
    if len(with_platform) < 2:
        return descs
    arch = _GOARCH.get(platform.machine(), platform.machine())
    mine = [d for d in with_platform
            if d["platform"].get("os") == "linux" and d["platform"].get("architecture") == arch]
    return [d for d in descs if d not in with_platform] + mine[:1]


def _opener(files: _Files, name: str) -> Callable[[], IO[bytes]]:
    return lambda: files.open(name)


def _docker_images(files: _Files) -> list[ImageSpec]:
    manifest = files.json("manifest.json")
    if not isinstance(manifest, list):
        raise files.bad("manifest.json is not a list")
    specs = []
    for entry in manifest:
        entry = _obj(files, entry, "a manifest.json entry")
        config_name = entry.get("Config")
        layer_names = _list(files, entry.get("Layers"), "Layers")
        tags = _list(files, entry.get("RepoTags"), "RepoTags")
        if not isinstance(config_name, str) or not all(isinstance(n, str) for n in layer_names + tags):
            raise files.bad("manifest.json: Config, Layers and RepoTags must be strings")
        config = files.read(config_name)
        layers = [LayerBlob(n, _opener(files, n)) for n in layer_names]
        specs.append(ImageSpec(config, layers, [normalize_ref(r) for r in tags]))
    return specs


@contextmanager
def open_source(source: str) -> Iterator[list[ImageSpec]]:
    """The images of ``source``: an OCI layout ``DIR`` or ``DIR:TAG``, or a docker-archive tar (gzip allowed).

    Raises:
        ImageFormatError: not a layout or archive, a missing blob or tag, bad JSON.
    """
    path, tag = source, None
    if not os.path.exists(path) and ":" in source:
        path, tag = source.rsplit(":", 1)
    p = Path(path)
    if p.is_dir():
        files = _dir_files(p)
        if not files.exists("oci-layout"):
            raise files.bad("not an OCI image layout (no oci-layout file)")
        yield _oci_images(files, tag, p.resolve().name)
        return
    if not p.exists():
        raise ImageFormatError(source=source, reason="no such file or directory")
    try:
        tf = tarfile.open(p, "r:*")
    except tarfile.TarError as e:
        detail = str(e) if "\n" not in str(e) else "neither gzip, bzip2, xz nor plain tar"
        raise ImageFormatError(source=source, reason=f"not a tar archive ({detail})") from None
    with tf:
        files = _tar_files(tf, str(p))
        if files.exists("manifest.json") and tag is None:
            yield _docker_images(files)
        elif files.exists("index.json"):
            yield _oci_images(files, tag, p.stem)
        else:
            raise files.bad("neither a docker archive (manifest.json) nor an OCI archive (index.json)")
