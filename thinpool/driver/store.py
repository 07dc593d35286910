"""The image and layer store: layers as snapshot chains keyed by ChainID, image configs, references; load and save.

Layer: driver. May import: thinpool.errors, thinpool.fs, thinpool.driver.*.

On disk (``<pool>/driver/image``), after moby's ``image/<driver>/``:

* ``layerdb/sha256/<chain-hex>/``: ``diff`` (DiffID), ``parent`` (parent ChainID), ``size`` (ApplyDiff's sum of
  entry sizes), ``cache-id`` (the device hash), ``tar-split.bin`` + ``tar-split.json`` (the uncompressed layer
  tar minus the content of regular files, which is read back from the layer's device: ``image save`` rebuilds
  the exact tar, so DiffIDs and image ids survive a load/save round trip);
* ``imagedb/content/sha256/<image-hex>``: the config blob (its sha256 is the image id);
* ``repositories.json``: ``{"Repositories": {name: {ref: image id}}}``.

A layer's device is a snapshot of its parent's (the bottom layer's of the base device) with the layer applied to
``/rootfs`` (:mod:`thinpool.driver.apply`); a layer whose ChainID is present is shared, never loaded again.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import os
import secrets
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from thinpool.driver.apply import LayerApplier
from thinpool.driver.blob import EofPadded, HashingReader, chain_ids, decompressed
from thinpool.driver.rootfs import ROOTFS, lstat
from thinpool.driver.source import ImageSpec, LayerBlob, normalize_ref, open_source
from thinpool.driver.state import DeviceSet, atomic_output, go_json, write_meta_file
from thinpool.errors import AmbiguousImage, DriverError, ImageFormatError, ImageNotFound
from thinpool.fs.filesystem import Filesystem

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
IO_CHUNK = 1 << 20


@dataclass
class Layer:
    chain_id: str
    diff_id: str
    parent: str | None
    size: int
    cache_id: str  # the device hash (and the device's name in the pool)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@contextmanager
def mounted(ds: DeviceSet, h: str, *, write: bool) -> Iterator[Filesystem]:
    """The ext2 of device ``h``; written back (and the pool committed) on a clean exit when ``write``."""
    fs = Filesystem.mount(ds.thin(ds.get(h)), readonly=not write)
    yield fs
    if write:
        fs.flush()


def driver_get(fs: Filesystem, h: str) -> None:
    """moby's ``Driver.Get`` on a mounted device: ``/rootfs`` (0755, root) and ``/id`` (0600) only if absent."""
    if lstat(fs, ROOTFS) is None:
        fs.mkdir(ROOTFS, 0o755)
        fs.chown(ROOTFS, 0, 0)
    if lstat(fs, "/id") is None:
        fs.write_file("/id", h.encode())
        fs.chmod("/id", 0o600)


class ImageStore:
    """Layers, images and references of one driver (an open :class:`DeviceSet`)."""

    def __init__(self, ds: DeviceSet) -> None:
        self.ds = ds
        self.root = ds.root / "image"
        self.layerdb = self.root / "layerdb" / "sha256"
        self.imagedb = self.root / "imagedb" / "content" / "sha256"
        self.layers: dict[str, Layer] = {}
        self.images: dict[str, bytes] = {}
        self.repos: dict[str, str] = {}
        self._load()

    # --- persistence ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self.layerdb.is_dir():
            for d in self.layerdb.iterdir():
                if not (d / "cache-id").exists():
                    continue  # a layer whose registration did not finish
                parent = (d / "parent").read_text() if (d / "parent").exists() else None
                self.layers["sha256:" + d.name] = Layer("sha256:" + d.name, (d / "diff").read_text(), parent,
                                                        int((d / "size").read_text()), (d / "cache-id").read_text())
        if self.imagedb.is_dir():
            for f in self.imagedb.iterdir():
                if not f.name.startswith("."):
                    self.images["sha256:" + f.name] = f.read_bytes()
        rp = self.root / "repositories.json"
        if rp.exists():
            for refs in json.loads(rp.read_bytes()).get("Repositories", {}).values():
                self.repos.update(refs)

    def _save_repos(self) -> None:
        out: dict[str, dict[str, str]] = {}
        for ref, image_id in sorted(self.repos.items()):
            out.setdefault(ref.rsplit(":", 1)[0], {})[ref] = image_id
        self.root.mkdir(parents=True, exist_ok=True)
        write_meta_file(self.root / "repositories.json", go_json({"Repositories": out}))

    # --- lookups ----------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """An image id from a reference (``NAME[:TAG]``), a full id (``sha256:...``) or a unique id prefix.

        Raises:
            ImageNotFound, AmbiguousImage.
        """
        for cand in (ref, normalize_ref(ref)):
            if cand in self.repos:
                return self.repos[cand]
        h = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        if h and all(c in "0123456789abcdef" for c in h):
            matches = [i for i in self.images if _hex(i).startswith(h)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousImage(ref=ref, matches=", ".join(sorted(_hex(m)[:12] for m in matches)))
        raise ImageNotFound(ref=ref)

    def config(self, image_id: str) -> dict[str, Any]:
        return json.loads(self.images[image_id])  # type: ignore[no-any-return]

    def diff_ids(self, image_id: str) -> list[str]:
        return list(self.config(image_id).get("rootfs", {}).get("diff_ids", []))

    def top_layer(self, image_id: str) -> Layer | None:
        chain = chain_ids(self.diff_ids(image_id))
        return self.layers[chain[-1]] if chain else None

    def refs_of(self, image_id: str) -> list[str]:
        return sorted(r for r, i in self.repos.items() if i == image_id)

    def device_hash(self, layer: Layer | None) -> str:
        return "" if layer is None else layer.cache_id

    # --- layers -----------------------------------------------------------------------------------------------
    def register_layer(self, parent: Layer | None, blob: LayerBlob, expect_diff_id: str | None) -> tuple[Layer, bool]:
        """Apply ``blob`` as a new layer on ``parent`` unless its ChainID is already here; (layer, created).

        The device is a snapshot of the parent's, named by a random cache id (as moby's layer store does), the
        layer applied into its ``/rootfs``. A DiffID that is not ``expect_diff_id`` is refused and the device
        deleted again.

        Raises:
            ImageFormatError: a bad tar, a DiffID or blob digest mismatch. PoolLowOnSpace: below min free space.
        """
        if expect_diff_id is not None:
            chain = _chain(parent, expect_diff_id)
            if chain in self.layers:
                return self.layers[chain], False
        cache_id = secrets.token_hex(32)
        ds = self.ds
        ds.add_device(cache_id, self.device_hash(parent), cache_id)
        try:
            with mounted(ds, cache_id, write=True) as fs:
                driver_get(fs, cache_id)
                rawf = blob.open()
                head = rawf.read(4)
                rawf.seek(0)
                raw = HashingReader(rawf)
                try:
                    stream = HashingReader(decompressed(raw, head))
                    applied = LayerApplier(fs, ROOTFS, source=blob.name).apply(EofPadded(stream))
                    stream.drain()
                    raw.drain()
                except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                    raise ImageFormatError(source=blob.name, reason=f"corrupt compressed layer ({e or 'truncated'})") \
                        from None
                except Exception as e:
                    if type(e).__name__ != "ZstdError":
                        raise
                    raise ImageFormatError(source=blob.name, reason=f"corrupt zstd layer ({e})") from None
                finally:
                    raw.f.close()
                diff_id = stream.digest
                if blob.digest is not None and blob.digest.startswith("sha256:") and raw.digest != blob.digest:
                    raise ImageFormatError(source=blob.name,
                                           reason=f"blob digest is {raw.digest}, the manifest says {blob.digest}")
                if expect_diff_id is not None and diff_id != expect_diff_id:
                    raise ImageFormatError(source=blob.name,
                                           reason=f"layer DiffID is {diff_id}, the config says {expect_diff_id}")
                chain = _chain(parent, diff_id)
                if chain in self.layers:
                    raise _AlreadyThere(self.layers[chain])
                d = self.layerdb / _hex(chain)
                d.mkdir(parents=True, exist_ok=True)
                self._write_split(d, blob, applied.files, fs)
        except _AlreadyThere as e:
            ds.delete_device(cache_id)
            return e.layer, False
        except BaseException:
            ds.delete_device(cache_id)
            raise
        layer = Layer(chain, diff_id, parent.chain_id if parent else None, applied.size, cache_id)
        (d / "diff").write_text(diff_id)
        if parent is not None:
            (d / "parent").write_text(parent.chain_id)
        (d / "size").write_text(str(applied.size))
        write_meta_file(d / "cache-id", cache_id.encode())  # last: the layer is registered
        self.layers[chain] = layer
        return layer, True

    def _write_split(self, d: Path, blob: LayerBlob, files: list[tuple[int, int, str, int]], fs: Filesystem) -> None:
        """The tar stream again, without the content of the regular files that are on the device as written."""
        elide = []
        for offset, size, path, ino in files:
            st = lstat(fs, path)
            if size and st is not None and st.ino == ino and st.size == size:
                elide.append((offset, size, path))
        elide.sort()
        raw = blob.open()
        try:
            stream = decompressed(raw)
            pos = 0
            with open(d / "tar-split.bin", "wb") as out:
                for offset, size, _ in elide:
                    _copy_n(stream, out, offset - pos)
                    _skip_n(stream, size)
                    pos = offset + size
                while True:
                    b = stream.read(IO_CHUNK)
                    if not b:
                        break
                    out.write(b)
        finally:
            raw.close()
        (d / "tar-split.json").write_bytes(go_json([[o, s, p] for o, s, p in elide]))

    def layer_tar(self, layer: Layer, out: IO[bytes]) -> str:
        """Write the layer's uncompressed tar (rebuilt from the tar-split and the device); returns its sha256.

        Raises:
            DriverError: the rebuilt tar does not hash to the DiffID (the layer's device was changed).
        """
        d = self.layerdb / _hex(layer.chain_id)
        elide = json.loads((d / "tar-split.json").read_bytes())
        h = hashlib.sha256()

        def put(b: bytes) -> None:
            h.update(b)
            out.write(b)

        with mounted(self.ds, layer.cache_id, write=False) as fs, open(d / "tar-split.bin", "rb") as split:
            pos = 0
            for offset, size, path in elide:
                n = offset - pos
                while n:
                    b = split.read(min(IO_CHUNK, n))
                    if not b:
                        raise DriverError(reason=f"layer {layer.chain_id}: tar-split ends early")
                    put(b)
                    n -= len(b)
                with fs.open(path, "rb") as f:
                    left = size
                    while left:
                        b = f.read(min(IO_CHUNK, left))
                        if not b:
                            raise DriverError(reason=f"layer {layer.chain_id}: {path} is shorter than recorded")
                        put(b)
                        left -= len(b)
                pos = offset + size
            while True:
                b = split.read(IO_CHUNK)
                if not b:
                    break
                put(b)
        digest = "sha256:" + h.hexdigest()
        if digest != layer.diff_id:
            raise DriverError(reason=f"layer {layer.chain_id}: rebuilt tar hashes to {digest}, not {layer.diff_id}")
        return digest

    # --- images -----------------------------------------------------------------------------------------------
    def add_image(self, spec: ImageSpec) -> str:
        """Register the layers and the config of one image; returns the image id."""
        try:
            config = json.loads(spec.config)
            diff_ids = list(config["rootfs"]["diff_ids"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ImageFormatError(source="config", reason=f"no rootfs.diff_ids ({e})") from None
        if len(diff_ids) != len(spec.layers):
            raise ImageFormatError(source="config", reason=f"{len(diff_ids)} diff_ids for {len(spec.layers)} layers")
        if not all(isinstance(d, str) for d in diff_ids):
            raise ImageFormatError(source="config", reason="a diff_id is not a string")
        parent = None
        created: list[Layer] = []
        try:
            for blob, diff_id in zip(spec.layers, diff_ids):
                parent, new = self.register_layer(parent, blob, diff_id)
                if new:
                    created.append(parent)
        except BaseException:
            self._forget(created)  # a refused image leaves no layer behind: a failing load changes nothing
            raise
        image_id = "sha256:" + hashlib.sha256(spec.config).hexdigest()
        if image_id not in self.images:
            self.imagedb.mkdir(parents=True, exist_ok=True)
            write_meta_file(self.imagedb / _hex(image_id), spec.config)
            self.images[image_id] = spec.config
        return image_id

    def tag(self, image_id: str, ref: str) -> None:
        self.repos[normalize_ref(ref)] = image_id
        self._save_repos()

    def load(self, source: str, tag: str | None = None) -> list[str]:
        """``docker load``: every image of ``source``; returns the lines ``Loaded image: REF`` (or ``Loaded image
        ID: sha256:...`` for an image without a reference)."""
        lines = []
        with open_source(source) as specs:
            if not specs:
                raise ImageFormatError(source=source, reason="no image in it")
            if tag is not None and len(specs) != 1:
                raise DriverError(reason=f"--tag names one image, {source} holds {len(specs)}")
            for spec in specs:
                image_id = self.add_image(spec)
                refs = [normalize_ref(tag)] if tag is not None else spec.refs
                for r in refs:
                    self.tag(image_id, r)
                    lines.append(f"Loaded image: {r}")
                if not refs:
                    lines.append(f"Loaded image ID: {image_id}")
        return lines

    def commit_image(self, parent_id: str | None, tar_path: str, comment: str) -> str:
        """A new image: the parent's config plus one layer (the tar at ``tar_path``)."""
        base: dict[str, Any] = self.config(parent_id) if parent_id else {
            "architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}
        top = self.top_layer(parent_id) if parent_id else None
        blob = LayerBlob(os.path.basename(tar_path), lambda: open(tar_path, "rb"))
        layer, _ = self.register_layer(top, blob, None)
        now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config: dict[str, Any] = dict(base)
        config["created"] = now
        config["rootfs"] = {"type": "layers", "diff_ids": list(base["rootfs"]["diff_ids"]) + [layer.diff_id]}
        config["history"] = list(base.get("history", [])) + [{"created": now, "created_by": comment}]
        raw = go_json(config)
        return self._add_config(raw)

    def _add_config(self, raw: bytes) -> str:
        image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.imagedb.mkdir(parents=True, exist_ok=True)
        write_meta_file(self.imagedb / _hex(image_id), raw)
        self.images[image_id] = raw
        return image_id

    def remove(self, ref: str, in_use: Callable[[str], str | None]) -> list[str]:
        """``docker rmi``: untag ``ref``; the image goes with its last reference (or when named by id), then every
        layer no image uses any more. ``in_use(image_id)`` names a container using it (a refusal)."""
        image_id = self.resolve(ref)
        out = []
        named = normalize_ref(ref) if normalize_ref(ref) in self.repos else (ref if ref in self.repos else None)
        refs = self.refs_of(image_id)
        if named is not None and len(refs) > 1:
            del self.repos[named]
            self._save_repos()
            return [f"Untagged: {named}"]
        if named is None and len(refs) > 1:
            raise DriverError(reason=f"conflict: unable to delete {_hex(image_id)[:12]} - image is referenced in "
                                     f"multiple repositories ({', '.join(refs)}): remove them by reference")
        user = in_use(image_id)
        if user is not None:
            from thinpool.errors import ImageInUse

            raise ImageInUse(ref=ref, container=user)
        for r in refs:
            del self.repos[r]
            out.append(f"Untagged: {r}")
        self._save_repos()
        del self.images[image_id]
        os.unlink(self.imagedb / _hex(image_id))
        out.append(f"Deleted: {image_id}")
        out.extend(self.release_layers())
        return out

    def release_layers(self) -> list[str]:
        """Delete every layer (device and record) that no image's chain includes, top layers first."""
        used: set[str] = set()
        for image_id in self.images:
            used.update(chain_ids(self.diff_ids(image_id)))
        out = []
        for chain in sorted(set(self.layers) - used, key=lambda c: -self._depth(c)):
            layer = self.layers.pop(chain)
            d = self.layerdb / _hex(chain)
            os.unlink(d / "cache-id")  # first: a crash leaves an unregistered directory, skipped on load
            self.ds.delete_device(layer.cache_id)
            for f in d.iterdir():
                os.unlink(f)
            d.rmdir()
            out.append(f"Deleted: {chain}")
        return out

    def _forget(self, layers: list[Layer]) -> None:
        """Delete ``layers`` (just registered, no image uses them yet), top first."""
        for layer in reversed(layers):
            self.layers.pop(layer.chain_id, None)
            d = self.layerdb / _hex(layer.chain_id)
            (d / "cache-id").unlink(missing_ok=True)  # first, as in release_layers
            self.ds.delete_device(layer.cache_id)
            if d.is_dir():
                for f in d.iterdir():
                    os.unlink(f)
                d.rmdir()

    def _depth(self, chain: str) -> int:
        n = 0
        layer = self.layers.get(chain)
        while layer is not None and layer.parent is not None:
            n += 1
            layer = self.layers.get(layer.parent)
        return n

    # --- save -------------------------------------------------------------------------------------------------
    def save(self, ref: str, out: str, fmt: str = "oci") -> str:
        """``docker save``: an OCI layout directory (the index carries the tag) or a docker-archive tar."""
        image_id = self.resolve(ref)
        refs = self.refs_of(image_id)
        named = normalize_ref(ref) if normalize_ref(ref) in self.repos else (refs[0] if refs else None)
        layers = [self.layers[c] for c in chain_ids(self.diff_ids(image_id))]
        if fmt == "oci":
            self._save_oci(image_id, named, layers, Path(out))
        elif fmt == "docker":
            self._save_docker(image_id, [named] if named else [], layers, out)
        else:
            raise DriverError(reason=f"unknown format {fmt!r}: use oci or docker")
        return image_id

    def _save_oci(self, image_id: str, ref: str | None, layers: list[Layer], out: Path) -> None:
        if out.exists() and not (out / "oci-layout").exists() and any(out.iterdir()):
            raise DriverError(reason=f"{out} exists and is not an OCI image layout")
        blobs = out / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        (out / "oci-layout").write_bytes(go_json({"imageLayoutVersion": "1.0.0"}))
        config = self.images[image_id]
        (blobs / _hex(image_id)).write_bytes(config)
        descs = []
        for layer in layers:
            size = self._write_layer_blob(layer, blobs / _hex(layer.diff_id))
            descs.append({"mediaType": OCI_LAYER, "digest": layer.diff_id, "size": size})
        manifest = go_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                            "config": {"mediaType": OCI_CONFIG, "digest": image_id, "size": len(config)},
                            "layers": descs})
        mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        (blobs / _hex(mdigest)).write_bytes(manifest)
        desc: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": len(manifest)}
        tag = None
        if ref:
            tag = ref.rsplit(":", 1)[1]
            desc["annotations"] = {CONTAINERD_NAME: ref, REF_NAME: tag}
        index_path = out / "index.json"
        index: dict[str, Any] = json.loads(index_path.read_bytes()) if index_path.exists() else \
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        if tag is not None:
            index["manifests"] = [m for m in index.get("manifests", [])
                                  if (m.get("annotations") or {}).get(REF_NAME) != tag]
        index.setdefault("manifests", []).append(desc)
        write_meta_file(index_path, go_json(index))

    def _write_layer_blob(self, layer: Layer, path: Path) -> int:
        if path.exists() and path.stat().st_size:
            return path.stat().st_size
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as f:
            self.layer_tar(layer, f)
        os.replace(tmp, path)
        return path.stat().st_size

    def _save_docker(self, image_id: str, refs: list[str], layers: list[Layer], out: str) -> None:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
            names = []
            for layer in layers:
                d = Path(tmp) / _hex(layer.diff_id)
                d.mkdir(exist_ok=True)
                (d / "VERSION").write_text("1.0")
                self._write_layer_blob(layer, d / "layer.tar")
                names.append(f"{_hex(layer.diff_id)}/layer.tar")
            (Path(tmp) / f"{_hex(image_id)}.json").write_bytes(self.images[image_id])
            manifest = [{"Config": f"{_hex(image_id)}.json", "RepoTags": refs or None, "Layers": names}]
            (Path(tmp) / "manifest.json").write_bytes(go_json(manifest))
            if refs and layers:
                repos: dict[str, dict[str, str]] = {}
                for r in refs:
                    name, t = r.rsplit(":", 1)
                    repos.setdefault(name, {})[t] = _hex(layers[-1].diff_id)
                (Path(tmp) / "repositories").write_bytes(go_json(repos))
            with atomic_output(out) as part, tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tw:
                for name in sorted(os.listdir(tmp)):
                    tw.add(os.path.join(tmp, name), arcname=name)

    def ls(self) -> list[dict[str, Any]]:
        rows = []
        for image_id, raw in sorted(self.images.items()):
            config = json.loads(raw)
            size = sum(self.layers[c].size for c in chain_ids(self.diff_ids(image_id)) if c in self.layers)
            refs = self.refs_of(image_id) or ["<none>:<none>"]
            for r in refs:
                repo, _, t = r.rpartition(":")
                rows.append({"repository": repo, "tag": t, "id": image_id, "created": config.get("created", ""),
                             "size": size, "layers": len(self.diff_ids(image_id)),
                             "device": self.ds.device_name(self.ds.get(self.device_hash(self.top_layer(image_id))))})
        return rows


class _AlreadyThere(Exception):
    def __init__(self, layer: Layer) -> None:
        self.layer = layer


def _copy_n(src: IO[bytes], dst: IO[bytes], n: int) -> None:
    while n > 0:
        b = src.read(min(IO_CHUNK, n))
        if not b:
            raise DriverError(reason="layer stream ended early while writing its tar-split")
        dst.write(b)
        n -= len(b)


def _skip_n(src: IO[bytes], n: int) -> None:
    while n > 0:
        b = src.read(min(IO_CHUNK, n))
        if not b:
            raise DriverError(reason="layer stream ended early while writing its tar-split")
        n -= len(b)



def _chain(parent: Layer | None, diff_id: str) -> str:
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent.chain_id} {diff_id}".encode()).hexdigest()
