"""kvplug stores as an SGLang HiCache storage backend (the L3 tier under SGLang's GPU and host KV tiers).

Loaded by SGLang's ``StorageBackendFactory`` through the dynamic route::

    --enable-hierarchical-cache --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name": "kvplug",
        "module_path": "kvplug.integrations.sglang.storage", "class_name": "KVPlugHiCacheStorage",
        "interface_v1": 1, "store": "redis://127.0.0.1:6379/0", "codec": "raw"}'

SGLang's page keys are chained SHA-256 hashes of the token ids only; they carry no model, rank, dtype or
layout. Every stored key here is ``sha256(namespace digest || page hash)``, where the namespace holds the
model, TP rank/size, PP/CP shard, dtype, page geometry and codec, so two servers that differ in any of those
never read each other's pages. Payloads are kvplug frames (versioned, checksummed, bound to their key); any
doubt about one is a miss, counted in ``kvplug_payload_errors``, and the entry is deleted. A store failure
(Redis down, disk error) is a miss or a failed write, never an exception into SGLang's I/O threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvplug import metrics
from kvplug.chunks import Namespace
from kvplug.codec import Codec, get_codec
from kvplug.connectors import ChunkStore, open_store
from kvplug.errors import ConfigError
from kvplug.integrations.sglang import check_version
from kvplug.integrations.sglang.pages import PageGeometry, geometry_of
from kvplug.payload import Payloads, mac_key_of

log = logging.getLogger("kvplug.sglang")

#: Keys of the extra config that SGLang itself reads or adds (passed through untouched). SGLang pops the
#: prefetch_* / pass-prefix / tp_lcm_size keys before the backend sees the config, and adds file_storage_path.
SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "allocator",
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
        "tp_lcm_size",
        "file_storage_path",
    }
)
#: KV dtypes the quantizing codecs understand (an fp8 KV cache sits in the host pool as uint8 bit patterns).
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Keys kvplug reads. Anything else is a typo and an error.
KVPLUG_KEYS = frozenset({"store", "codec", "codec_params", "model_id", "tenant_salt", "skip_existing", "secret"})
#: Codecs that need the canonical ``[layers, 2, tokens, heads, dim]`` layout (quantizers).
_BYTE_CODECS = ("raw", "zstd", "lz4")


def parse_extra_config(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the kvplug part of ``--hicache-storage-backend-extra-config``; returns kvplug's settings."""
    extra = dict(extra or {})
    unknown = set(extra) - SGLANG_KEYS - KVPLUG_KEYS
    if unknown:
        raise ConfigError(
            f"kvplug HiCache backend: unknown extra-config key(s) {sorted(unknown)}; "
            f"kvplug reads {sorted(KVPLUG_KEYS)}, SGLang reads {sorted(SGLANG_KEYS)}"
        )
    if not extra.get("store"):
        raise ConfigError(
            'kvplug HiCache backend: extra config needs "store" (e.g. "redis://127.0.0.1:6379/0" or "file:///path")'
        )
    params = extra.get("codec_params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"kvplug HiCache backend: codec_params must be an object, got {params!r}")
    out = {
        "store": str(extra["store"]),
        "codec": str(extra.get("codec", "raw")),
        "codec_params": params,
        "model_id": extra.get("model_id"),
        "tenant_salt": str(extra.get("tenant_salt", "")),
        "skip_existing": bool(extra.get("skip_existing", True)),
        # the payload secret: from the extra config or KVPLUG_SECRET (never logged)
        "secret": extra.get("secret") or os.environ.get("KVPLUG_SECRET") or None,
    }
    get_codec(out["codec"], **params)  # unknown codec or bad parameters: ConfigError now, not at first write
    return out


class KVPlugHiCacheStorage(HiCacheStorage):
    """HiCache L3 backend over any kvplug store (memory, file, Redis, Sentinel, Cluster, tiered) and codec."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        check_version()
        self.config = storage_config
        self.settings = parse_extra_config(storage_config.extra_config)
        if storage_config.should_split_heads:
            raise ConfigError("kvplug HiCache backend: split-head storage (heterogeneous TP) is not supported")
        codec: Codec = get_codec(self.settings["codec"], **self.settings["codec_params"])
        self.store: ChunkStore = open_store(self.settings["store"])
        self.payloads = Payloads(self.store, codec, mac_key_of(self.settings["secret"]))
        self.geometry: PageGeometry | None = None
        self.namespace: Namespace | None = None
        self._lock = threading.Lock()
        self._pending_metrics: dict[str, list[float]] = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bw": []}
        # MLA KV is replicated across TP ranks: one shared copy, written by the designated writer only.
        self.writer = storage_config.is_storage_writer

    @property
    def codec(self) -> Codec:
        return self.payloads.codec

    @property
    def payload_errors(self) -> dict[str, int]:
        return self.payloads.errors

    # ---- set-up --------------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        try:  # some pools (page_unified, asymmetric K/V, MXFP8) have no page accessors: refuse now, not per batch
            mem_pool_host.get_data_page(0, flat=True)
        except Exception as e:  # noqa: BLE001 - any failure here means the pool cannot be served
            raise ConfigError(
                f"kvplug HiCache backend: host pool {type(mem_pool_host).__name__} "
                f"({getattr(mem_pool_host, 'layout', '?')}) has no usable page accessors: {e}"
            ) from e
        self.bind_geometry(geometry_of(mem_pool_host))
        cfg = self.config
        # With decode context parallelism the controller steps host indices by the logical page size.
        self._index_step = int(cfg.logical_page_size or 0) or self.geometry.page_size  # type: ignore[union-attr]

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        raise ConfigError(
            f"kvplug HiCache backend: hybrid models (side pool {host_pool_name!r}) need the v2 storage interface, "
            "which kvplug does not implement yet"
        )

    def bind_geometry(self, geometry: PageGeometry) -> None:
        """Fix the page geometry (from the host pool) and with it the namespace every key is derived from."""
        cfg, s = self.config, self.settings
        if s["codec"] not in _BYTE_CODECS and (not geometry.canonical or geometry.dtype not in _FLOAT_DTYPES):
            raise ConfigError(
                f"kvplug HiCache backend: codec {s['codec']!r} needs an MHA host pool in a known layout holding "
                f"float16/bfloat16/float32 KV; this pool is {geometry.pool_class} ({geometry.layout}, "
                f"{geometry.dtype}): use one of {list(_BYTE_CODECS)}"
            )
        mla = bool(cfg.is_mla_model)
        dtype = str(geometry.dtype).removeprefix("torch.")
        self.geometry = geometry
        self.namespace = Namespace(
            model=s["model_id"] or cfg.model_name or "unknown-model",
            dtype=dtype,
            num_layers=max(geometry.layers, 1),
            num_kv_heads=geometry.heads,
            head_dim=max(geometry.head_dim, 1),
            layout="layers,kv,tokens,heads,dim"
            if geometry.canonical
            else f"sglang-opaque:{geometry.pool_class}:{geometry.layout}",
            tp_rank=0 if mla else cfg.tp_rank,
            tp_size=1 if mla else cfg.tp_size,
            codec=self.codec.name,
            codec_params=Namespace.items(self.codec.params()),
            tenant_salt=s["tenant_salt"],
            auth=self.payloads.mac_key.key_id if self.payloads.mac_key else "",
            chunk_size=geometry.page_size,
            extra=Namespace.items(
                {
                    "engine": "sglang-hicache",
                    "pp": f"{cfg.pp_rank}/{cfg.pp_size}",
                    "attn_cp": f"{cfg.attn_cp_rank}/{cfg.attn_cp_size}",
                    "dcp": f"{cfg.dcp_rank}/{cfg.dcp_size}",
                    "mla": mla,
                }
            ),
        )
        log.info(
            "kvplug HiCache backend: store=%s codec=%s pool=%s/%s namespace=%s",
            self.store.name,
            self.codec.name,
            geometry.pool_class,
            geometry.layout,
            self.namespace.digest.hex()[:12],
        )

    def store_key(self, key: str) -> str:
        """The store key of one SGLang page key in this server's namespace."""
        if self.namespace is None:
            raise RuntimeError("kvplug HiCache backend used before SGLang registered its host memory pool")
        return self.namespace.scoped_key(key)

    # ---- encode / decode -----------------------------------------------------------------------------------
    def _encode(self, skey: str, page: torch.Tensor) -> bytes:
        """Encode one page given in host order (a view into the host pool or a flat copy)."""
        g = self.geometry
        assert g is not None
        t = g.to_canonical(page) if g.canonical else page.reshape(-1)
        return self.payloads.encode(skey, t.contiguous())

    def _decode(self, skey: str, payload: bytes) -> torch.Tensor | None:
        g = self.geometry
        assert g is not None
        return self.payloads.decode(skey, payload, g.stored_shape, g.dtype)

    def _host_view(self, decoded: torch.Tensor) -> torch.Tensor:
        """A decoded page in host order, flat."""
        g = self.geometry
        assert g is not None
        return (g.from_canonical(decoded) if g.canonical else decoded).reshape(-1)

    def _fetch(self, keys: Sequence[str]) -> list[tuple[str, torch.Tensor | None]]:
        skeys = [self.store_key(k) for k in keys]
        payloads = self.store.get_many(skeys)
        return [(sk, None if p is None else self._decode(sk, p)) for sk, p in zip(skeys, payloads, strict=True)]

    def _write(self, keys: Sequence[str], pages: Sequence[torch.Tensor]) -> list[bool]:
        if not keys:
            return []
        if not self.writer:
            return [True] * len(keys)  # MLA: another rank writes the shared copy
        skeys = [self.store_key(k) for k in keys]
        todo = list(range(len(skeys)))
        if self.settings["skip_existing"]:
            present = self.store.exists_many(skeys)
            todo = [i for i in todo if not present[i]]
        items = [(skeys[i], self._encode(skeys[i], pages[i])) for i in todo]
        stored = self.store.put_many(items) if items else 0
        if stored == len(items):
            return [True] * len(keys)
        # put_many reports a count; find out which made it so SGLang only marks those as backed up.
        ok = self.store.exists_many(skeys)
        return ok

    # ---- the legacy (copying) interface ---------------------------------------------------------------------
    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(
        self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
    ) -> list[torch.Tensor | None]:
        try:
            return self._batch_get(keys, target_locations)
        except Exception as e:  # noqa: BLE001
            self._failed("get", e)
            return [None] * len(keys)

    def _batch_get(self, keys: list[str], target_locations: Any | None) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        for (_, page), target in zip(self._fetch(keys), targets, strict=True):
            if page is None:
                out.append(None)
                continue
            flat = self._host_view(page)
            if target is None:
                out.append(flat.contiguous())
            elif target.numel() != flat.numel():
                log.warning("kvplug: target page holds %d elements, stored page %d: miss", target.numel(), flat.numel())
                out.append(None)
            else:
                target.view(-1).copy_(flat)
                out.append(target)
        return out

    def set(
        self, key: str, value: Any | None = None, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        if values is None or len(values) != len(keys):
            raise ValueError(f"batch_set: {len(keys)} keys but {0 if values is None else len(values)} values")
        try:
            ok = self._write(keys, list(values))
        except Exception as e:  # noqa: BLE001
            self._failed("save", e)
            return False
        self._note("backup", sum(ok), 0, 0.0)
        return all(ok)

    def exists(self, key: str) -> bool:
        return self.store.exists_many([self.store_key(key)])[0]

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """Number of leading keys present (SGLang's prefix semantics), in one round trip."""
        return self.store.contains([self.store_key(k) for k in keys])

    # ---- the zero-copy v1 interface (``"interface_v1": 1``): pages move straight to/from the host pool -----
    def _page_index(self, host_indices: torch.Tensor, i: int) -> int:
        return int(host_indices[i * self._index_step].item())

    def _failed(self, op: str, e: BaseException) -> None:
        """An unexpected error inside a storage call: logged and counted, never raised into SGLang's threads."""
        log.warning("kvplug HiCache backend: %s failed (%s: %s); treated as a miss", op, type(e).__name__, e)
        metrics.CONNECTOR_ERRORS.labels("sglang", op).inc()

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        try:
            return self._batch_get_v1(keys, host_indices)
        except Exception as e:  # noqa: BLE001
            self._failed("get", e)
            return [False] * len(keys)

    def _batch_get_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        t0 = time.perf_counter()
        pool = self.mem_pool_host
        g = self.geometry
        assert g is not None
        results: list[bool] = []
        nbytes = 0
        for i, (_, page) in enumerate(self._fetch(keys)):
            if page is None or (results and not results[-1]):
                results.append(False)  # SGLang uses the leading run of hits only: stop copying after a miss
                continue
            index = self._page_index(host_indices, i)
            if g.canonical:
                pool.get_data_page(index, flat=False).copy_(g.from_canonical(page))
            else:
                pool.set_from_flat_data_page(index, page.reshape(-1))
            nbytes += page.numel() * page.element_size()
            results.append(True)
        self._note("prefetch", sum(results), nbytes, time.perf_counter() - t0)
        return results

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        try:
            return self._batch_set_v1(keys, host_indices)
        except Exception as e:  # noqa: BLE001
            self._failed("save", e)
            return [False] * len(keys)

    def _batch_set_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        pool = self.mem_pool_host
        g = self.geometry
        assert g is not None
        pages = [pool.get_data_page(self._page_index(host_indices, i), flat=not g.canonical) for i in range(len(keys))]
        results = self._write(keys, pages)
        self._note("backup", sum(results), 0, 0.0)
        return results

    # ---- housekeeping --------------------------------------------------------------------------------------
    def _note(self, kind: str, pages: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._pending_metrics[f"{kind}_pgs"].append(pages)
            if kind == "prefetch" and seconds > 0:
                self._pending_metrics["prefetch_bw"].append(nbytes / seconds / 1e9)

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` (pages per prefetch/backup and prefetch GB/s since the last call)."""
        with self._lock:
            pending, self._pending_metrics = self._pending_metrics, {k: [] for k in self._pending_metrics}
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # noqa: BLE001 - metrics are optional; never fail the caller over them
            return None
        m = StorageMetrics()
        m.prefetch_pgs, m.backup_pgs, m.prefetch_bandwidth = (
            pending["prefetch_pgs"],
            pending["backup_pgs"],
            pending["prefetch_bw"],
        )
        return m

    def clear(self) -> bool:
        """SGLang's ``/clear_hicache_storage_backend``. Keys are hashed, so this cannot pick out one
        namespace: it only clears stores owned by this server (``memory://``); shared stores are left alone."""
        if self.store.kind == "memory":
            self.store.purge()
            return True
        log.warning("kvplug: clear() on shared store %s ignored; use `kvplug store purge URL`", self.store.name)
        return False

    def close(self) -> None:
        self.store.close()
