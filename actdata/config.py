"""The config schema, defined once: typed dataclasses registered with Hydra, their validation, and
the memory estimate.

Every key here is a contract: other tools start the server with `key=value` overrides. `validate`
runs before anything is allocated and raises `ConfigError` with one line naming the bad key.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

DTYPES = ("float32", "float16", "bfloat16")  # the names of actdata.wire.DTYPES (this module needs no torch)
SOURCES = ("model", "synthetic", "store")
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
SYNTHETIC_DIM = 768
SITES = ("resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out")


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port and report it
    workers: int = 2  # HTTP processes sharing the port, each reading the shared buffer
    accelerator: str = "auto"  # auto | cpu | cuda: where generators run (one per device)
    devices: Any = "auto"  # number of devices, or auto
    max_samples_per_request: int = 65536
    max_bytes_per_request: int = 1 << 30
    retry_after_s: int = 1  # Retry-After sent with 503 while the buffer fills
    api_key: Optional[str] = None  # also ACTDATA_API_KEY; when set, every route but GET / needs it
    log_file: Optional[str] = "actdata.log"  # null = console only
    status_interval_s: float = 10.0  # console status line period; 0 = off
    ready_file: Optional[str] = None  # when set, {"url", "port", "pid"} is written here once serving
    node_rank: int = 0  # this server's index among num_nodes servers sharing one corpus (a cluster)
    num_nodes: int = 1  # generator g of G: g = node_rank * local generators + worker index
    generators_per_device: int = 1  # generator workers per device (2 on the CPU: two disjoint corpus shares)
    # Hostile-load limits, per HTTP process (see actdata/serving/httpguard.py and README "Reliability")
    max_header_bytes: int = 65536  # request head larger than this: 431, closed while it is being read
    header_timeout_s: float = 10.0  # request head not complete this long after connecting: 408, closed
    keep_alive_s: float = 5.0  # idle keep-alive connections closed after this
    send_timeout_s: float = 30.0  # a response the client does not read for this long is aborted
    max_connections: int = 0  # open connections per HTTP process; 0 = from the open-file limit
    max_inflight: int = 256  # requests running per HTTP process; more get a fast 503 + Retry-After
    response_memory_bytes: int = 256 << 20  # response bodies held at once per HTTP process (503 above);
    # one request may use half of it, which caps num_samples on /activations/tensor
    max_json_bytes: int = 64 << 20  # JSON text of one /activations answer; caps its num_samples


@dataclass
class BufferConfig:
    size: int = 1000  # rows (capacity)
    activation_dim: Optional[int] = None  # width of a row; null = follow the model (synthetic: 768)
    sample_shape: Optional[List[int]] = None  # synthetic source only: overrides [activation_dim]
    dtype: str = "float32"  # auto = the model's dtype if bfloat16/float16, else float32 (resolved at start)
    min_fill: float = 0.5  # fraction of capacity READY before serving starts
    max_reads: int = 1  # times a row is served before it is refilled (1 = serve once)
    path: Optional[str] = None  # null = POSIX shm (/dev/shm); a directory or file = memory-mapped file
    prefix: str = "actdata"  # segment names start with this; stale ones of dead runs are reclaimed
    warm_start: Optional[str] = None  # a store (see `store`): fill the buffer from it first, then generate
    reserve: bool = True  # allocate the file's space at start (fallocate): no SIGBUS when the filesystem fills
    max_groups: int = 0  # consumer groups (each receives every row; 0 = off, as before); up to 64
    groups_expected: int = 0  # hold serving until this many groups have registered (a sweep loses no row)
    group_idle_s: float = 60.0  # a group that reads nothing for this long is dropped and its rows released
    group_lag: str = "wait"  # wait: the slowest group sets the pace; skip: a lagging group's unread rows are released


@dataclass
class ModelConfig:
    name: str = "embedded"  # hub id, local directory, or `embedded` (SmolLM2-135M shipped by a package)
    dtype: str = "auto"  # auto = bfloat16 on CUDA; on the CPU bfloat16 where it has native bf16, else float32
    device: str = "auto"  # auto = the device LitServe hands the generator worker (set by hand: server.devices=1)
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class DatasetConfig:
    name: str = "embedded"  # hub dataset, local file/dir (txt/jsonl/json/parquet), or `embedded` (KJV Bible)
    config: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True
    shuffle_buffer: int = 10000  # documents shuffled within this window (streaming)
    seed: int = 0


@dataclass
class GeneratorConfig:
    source: str = "synthetic"  # model | synthetic | store (replay store.path, no model loaded)
    batch_size: int = 8  # contexts per forward
    auto_batch: bool = True  # CUDA: batch_size grows towards 32k tokens per forward within the memory estimate
    context_length: int = 128  # tokens per context, BOS included
    sites: List[str] = field(default_factory=lambda: ["resid_post"])  # named points or module.path:input|output
    layers: Any = field(default_factory=lambda: [6])  # list of block indices, or "all"
    squeeze: bool = True  # one site at one layer -> rows of [d_model] instead of [1, 1, d_model]
    drop_bos: bool = True
    drop_special: bool = True  # pad and other special tokens never reach the buffer
    outlier_factor: Optional[float] = None  # drop rows whose norm exceeds this multiple of the running median
    rows_per_second: Optional[float] = None  # synthetic source: throttle; null = flat out
    compile: bool = False  # torch.compile blocks without capture sites (~5-10% faster on CPU; ~10-35 s more start-up)
    seed: int = 0  # seeds torch per generator (torch.manual_seed(seed, g)); the corpus order follows dataset.seed
    state_dir: Optional[str] = "auto"  # saved corpus position + statistics per generator; auto = user cache dir
    # derived from the config's identity; null = no resume (every start reads its share from the beginning)
    provenance: bool = False  # keep token id, position and context id per row (GET ...?provenance=1)
    statistics: Optional[bool] = None  # running mean/variance/norms of the rows written (GET /statistics);
    # null = on (every source: reduced in float32 beside the writer, or on the GPU before the copy)


@dataclass
class StoreConfig:
    path: Optional[str] = None  # a directory (local, or s3://, gs://... where fsspec has the filesystem)
    write: bool = False  # true: every generated row is also appended to shards in path
    shard_rows: Optional[int] = None  # rows per shard; null = about 256 MB per shard
    max_bytes: Optional[int] = None  # stop writing (and keep serving) once shards would exceed this
    queue_mb: int = 256  # rows waiting for the disk; beyond this the generator waits for the writer
    stats: bool = True  # keep running statistics of the stored rows in the manifest
    seed: int = 0  # replay: shard order is shuffled per pass with (seed, pass)
    passes: Optional[int] = None  # replay: passes over the shards; null = endless
    column: Optional[str] = None  # replay of a datasets.save_to_disk directory: the activation column


@dataclass
class ClusterConfig:
    """`python -m actdata.cluster` only: where the Ray cluster is, which nodes serve, the directory."""

    address: str = "auto"  # Ray cluster: auto (the one started on this machine) | HOST:PORT | ray://HOST:PORT
    nodes: Any = "auto"  # auto = nodes with GPUs (all nodes when none has one) | a number | a resource label
    cpus_per_server: float = 1.0  # Ray CPUs reserved by each server actor
    gpus_per_server: Any = "auto"  # auto = every GPU of its node | a number
    max_restarts: int = 10  # times Ray restarts a dead server actor (-1 = without limit)
    start_timeout_s: float = 300.0  # a server not answering this long after placement is reported as a problem
    directory_host: str = "127.0.0.1"  # the directory's bind address (0.0.0.0 needs an API key)
    directory_port: int = 8100  # 0 = any free port (printed)
    poll_interval_s: float = 0.5  # the directory polls each server's /stats this often
    drop_after_s: float = 2.0  # a server that has not answered for this long is no longer listed
    ready_file: Optional[str] = None  # when set, {"url", "port", "pid"} of the directory is written here


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    log_level: str = "INFO"


def register() -> None:
    """Register the schema with Hydra's ConfigStore as `actdata_schema` (conf/config.yaml extends it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="actdata_schema", node=Config)


def to_config(cfg: Any) -> Config:
    """A Hydra/OmegaConf node (or a Config) -> a plain Config of Python objects, safe to pickle."""
    if isinstance(cfg, Config):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. BUFFER_SIZE=lots with +preset=env: one line, key and variable
        raise ConfigError(describe_conversion_error(e)) from None
    if isinstance(obj, Config):
        return obj
    raise ConfigError(f"config: expected the actdata schema, got {type(obj).__name__}")


def _leaves(cls=None, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema -> its type (a section's keys, not the section itself)."""
    import dataclasses
    import typing

    cls = cls or Config
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


_BOOLS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _scalar(tp) -> tuple[Optional[str], bool]:
    """("int" | "float" | "bool" | None, whether null is allowed) of a schema field's type."""
    import typing

    args = typing.get_args(tp)
    nullable = typing.get_origin(tp) is typing.Union and type(None) in args
    if nullable:
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    return {int: "int", float: "float", bool: "bool"}.get(tp), nullable


def check_overrides(args: list[str]) -> list[str]:
    """Check the command line's plain `key=value` overrides against the schema before Hydra sees them:
    an unknown key or a value of the wrong kind raises ConfigError with one line naming the key (and the
    nearest keys); an integer key given in float notation with an integral value (`buffer.size=1e6`) is
    rewritten as the integer. Other arguments (`+preset=...`, `+key=`, `~key`, `hydra.*`, flags, values
    with interpolations, sweeps or quotes) pass unchanged: Hydra checks those."""
    import difflib
    import re

    leaves = _leaves()
    out = []
    for arg in args:
        m = re.fullmatch(r"([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)", arg, flags=re.S)
        if not m or m.group(1).split(".")[0] in ("hydra", "preset"):
            out.append(arg)
            continue
        key, value = m.groups()
        if key not in leaves:
            section, _, name = key.rpartition(".")
            names = [k[len(section) + 1:] for k in leaves if section and k.startswith(section + ".")]
            if names:  # a known section: its nearest keys, else all of them
                near = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=2, cutoff=0.6)]
                hint = f"did you mean {' or '.join(near)}?" if near else f"{section} has {', '.join(names)}"
            else:
                near = difflib.get_close_matches(key, leaves, n=2, cutoff=0.8)
                hint = (f"did you mean {' or '.join(near)}?" if near else
                        f"the top-level keys are {', '.join(sorted({k.split('.')[0] for k in leaves}))}")
            raise ConfigError(f"{key}: no such key ({hint})")
        kind, nullable = _scalar(leaves[key])
        v = value.strip()
        if (any(c in v for c in "${},()") or v[:1] in ("'", '"')  # interpolations, sweeps, quoting: Hydra's
                or (nullable and v.lower() in ("null", "none", "~"))):
            out.append(arg)
            continue
        if kind == "int":
            try:
                int(v, 10)
            except ValueError:
                try:
                    f = float(v)
                except ValueError:
                    f = math.nan
                if not (math.isfinite(f) and f == int(f)):
                    raise ConfigError(f"{key}: {value!r} is not an integer") from None
                arg = f"{key}={int(f)}"  # buffer.size=1e6 -> 1000000
        elif kind == "float":
            try:
                float(v)
            except ValueError:
                raise ConfigError(f"{key}: {value!r} is not a number") from None
        elif kind == "bool" and v.lower() not in _BOOLS:
            raise ConfigError(f"{key}: {value!r} is not true or false")
        out.append(arg)
    return out


def describe_conversion_error(e: Exception) -> str:
    """One line for a value OmegaConf could not convert: the dotted key, and the environment variable and
    its value when the value came from `${oc.env:VAR,default}` (the env preset)."""
    import re

    key = getattr(e, "full_key", None) or "config"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    env = re.search(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)", text)
    target = re.search(r"could not be converted to (\w+)", text)
    want = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(
        target.group(1), target.group(1)) if target else None
    if env:
        var = env.group(1)
        return (f"{key}: ${var}={os.environ.get(var, '')!r} is not {want}" if want else
                f"{key}: from ${var}={os.environ.get(var, '')!r}: {text}")
    return f"{key}: {text}"


def synthetic_shape(cfg: Config) -> tuple[int, ...]:
    b = cfg.buffer
    if b.sample_shape:
        return tuple(int(x) for x in b.sample_shape)
    return (int(b.activation_dim or SYNTHETIC_DIM),)


def estimate_bytes(cfg: Config, shape: tuple[int, ...]) -> int:
    """Bytes the buffer will take: rows plus the per-slot index arrays and group region (actdata.shm.layout)."""
    from .shm.layout import index_bytes
    from .wire import row_bytes

    b = cfg.buffer
    return b.size * row_bytes(shape, b.dtype) + index_bytes(b.size, cfg.generator.provenance, b.max_groups, b.max_reads)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first bad key. Checks values only; space is checked by the buffer."""
    s, b, m, d, g = cfg.server, cfg.buffer, cfg.model, cfg.dataset, cfg.generator
    _check(s.host in HOSTS, "server.host", f"must be one of {', '.join(HOSTS)} (LitServe binds these), got {s.host!r}")
    _check(s.port == 0 or 1024 <= s.port <= 65535, "server.port",
           f"must be 1024..65535, or 0 for any free port, got {s.port}")
    _check(s.workers >= 1, "server.workers", f"must be >= 1, got {s.workers}")
    _check(s.accelerator in ("auto", "cpu", "cuda", "gpu", "mps"), "server.accelerator",
           f"must be auto, cpu, cuda or mps, got {s.accelerator!r}")
    _check(s.devices == "auto" or (isinstance(s.devices, int) and s.devices >= 1), "server.devices",
           f"must be auto or an integer >= 1, got {s.devices!r}")
    _check(s.max_samples_per_request >= 1, "server.max_samples_per_request", "must be >= 1")
    _check(s.max_bytes_per_request >= 1, "server.max_bytes_per_request", "must be >= 1")
    _check(s.retry_after_s >= 0, "server.retry_after_s", "must be >= 0")
    _check(s.status_interval_s >= 0, "server.status_interval_s", "must be >= 0")
    _check(s.num_nodes >= 1, "server.num_nodes", f"must be >= 1, got {s.num_nodes}")
    _check(s.generators_per_device >= 1, "server.generators_per_device", f"must be >= 1, got {s.generators_per_device}")
    _check(0 <= s.node_rank < s.num_nodes, "server.node_rank",
           f"must be in 0..server.num_nodes-1 = 0..{s.num_nodes - 1}, got {s.node_rank}")
    _check(s.max_header_bytes >= 1024, "server.max_header_bytes", f"must be >= 1024, got {s.max_header_bytes}")
    for key in ("header_timeout_s", "keep_alive_s", "send_timeout_s"):
        _check(getattr(s, key) > 0, f"server.{key}", f"must be > 0 seconds, got {getattr(s, key)}")
    _check(s.max_connections >= 0, "server.max_connections", "must be >= 0 (0 = from the open-file limit)")
    _check(s.max_inflight >= 1, "server.max_inflight", f"must be >= 1, got {s.max_inflight}")
    _check(s.response_memory_bytes >= 1 << 20, "server.response_memory_bytes", "must be >= 1 MiB")
    _check(s.max_json_bytes >= 4096, "server.max_json_bytes", "must be >= 4096")

    _check(b.size >= 1, "buffer.size", f"must be a positive number of rows, got {b.size}")
    _check(b.dtype in ("auto", *DTYPES), "buffer.dtype", f"must be auto or one of {', '.join(DTYPES)}, got {b.dtype!r}")
    _check(b.activation_dim is None or b.activation_dim >= 1, "buffer.activation_dim",
           f"must be a positive width or null, got {b.activation_dim}")
    if b.sample_shape is not None:
        _check(len(b.sample_shape) >= 1 and all(int(x) >= 1 for x in b.sample_shape), "buffer.sample_shape",
               f"must be a non-empty list of positive sizes, got {list(b.sample_shape)}")
    _check(0.0 <= b.min_fill <= 1.0, "buffer.min_fill", f"must be a fraction in [0, 1], got {b.min_fill}")
    _check(b.max_reads >= 1, "buffer.max_reads", f"must be >= 1 (1 = serve each row once), got {b.max_reads}")
    from .shm.layout import GROUP_POLICIES, MAX_GROUPS

    _check(0 <= b.max_groups <= MAX_GROUPS, "buffer.max_groups",
           f"must be 0..{MAX_GROUPS} (0 = no consumer groups), got {b.max_groups}")
    _check(0 <= b.groups_expected <= b.max_groups, "buffer.groups_expected",
           f"must be 0..buffer.max_groups={b.max_groups}, got {b.groups_expected}")
    _check(b.group_idle_s > 0, "buffer.group_idle_s", f"must be > 0 seconds, got {b.group_idle_s}")
    _check(b.group_lag in GROUP_POLICIES, "buffer.group_lag", f"must be wait or skip, got {b.group_lag!r}")
    _check(bool(b.prefix) and "/" not in b.prefix, "buffer.prefix", "must be a non-empty name without '/'")
    if b.path is not None:
        parent = b.path if os.path.isdir(b.path) else (os.path.dirname(os.path.abspath(b.path)) or ".")
        _check(os.path.isdir(parent), "buffer.path", f"directory {parent!r} does not exist")

    _check(g.source in SOURCES, "generator.source", f"must be one of {', '.join(SOURCES)}, got {g.source!r}")
    if g.source == "synthetic":
        n = math.prod(synthetic_shape(cfg))
        _check(n >= 16, "buffer.activation_dim", f"synthetic rows need >= 16 values to carry id and check, got {n}")
    _check(g.batch_size >= 1, "generator.batch_size", f"must be >= 1, got {g.batch_size}")
    _check(g.context_length >= 2, "generator.context_length", f"must be >= 2, got {g.context_length}")
    _check(isinstance(g.sites, (list, tuple)) and len(g.sites) >= 1, "generator.sites", "must be a non-empty list")
    for site in g.sites:
        _check(site in SITES or ":" in str(site), "generator.sites",
               f"{site!r} is neither a named point ({', '.join(SITES)}) nor 'module.path:input|output'")
        if ":" in str(site):
            _check(str(site).rsplit(":", 1)[1] in ("input", "output"), "generator.sites",
                   f"{site!r}: a raw site ends in ':input' or ':output'")
    _check(g.layers == "all" or (isinstance(g.layers, (list, tuple)) and len(g.layers) >= 1
                                 and all(isinstance(x, int) and x >= 0 for x in g.layers)),
           "generator.layers", f"must be 'all' or a non-empty list of block indices >= 0, got {g.layers!r}")
    _check(g.outlier_factor is None or g.outlier_factor > 1.0, "generator.outlier_factor",
           "must be null or > 1 (a multiple of the running median norm)")
    _check(g.rows_per_second is None or g.rows_per_second > 0, "generator.rows_per_second", "must be null or > 0")

    validate_cluster(cfg.cluster)

    st = cfg.store
    if g.source == "store":
        _check(bool(st.path), "store.path", "generator.source=store replays a store: set store.path=DIR")
        _check(not st.write, "store.write", "cannot write the store that generator.source=store replays")
    if st.write:
        _check(bool(st.path), "store.path", "store.write=true needs a directory: set store.path=DIR")
    _check(st.shard_rows is None or st.shard_rows >= 1, "store.shard_rows",
           f"must be null or >= 1, got {st.shard_rows}")
    _check(st.max_bytes is None or st.max_bytes >= 1, "store.max_bytes", f"must be null or >= 1, got {st.max_bytes}")
    _check(st.queue_mb >= 1, "store.queue_mb", f"must be >= 1, got {st.queue_mb}")
    _check(st.passes is None or st.passes >= 1, "store.passes", f"must be null or >= 1, got {st.passes}")
    _check(b.warm_start is None or g.source != "store", "buffer.warm_start",
           "warm-starts a generating server; with generator.source=store the store is the source")

    _check(m.dtype in ("auto", *DTYPES), "model.dtype", f"must be auto or one of {', '.join(DTYPES)}, got {m.dtype!r}")
    if m.device not in ("auto", "", None):
        _check(s.accelerator == "cpu" or s.devices == 1, "model.device",
               f"set by hand ({m.device!r}) while server.devices={s.devices!r} may start one generator per device: "
               "every generator would load its model onto that one device; set server.devices=1 to use it, "
               "or model.device=auto to give each generator its own device")
    _check(bool(m.name), "model.name", "must name a hub model, a local directory or 'embedded'")
    _check(bool(d.name), "dataset.name", "must name a hub dataset, a local file or 'embedded'")
    _check(cfg.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "log_level",
           f"must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}")


def validate_cluster(c: ClusterConfig) -> None:
    """The `cluster` group's values (checked with the rest; only actdata.cluster uses them)."""
    _check(bool(c.address), "cluster.address", "must be auto, HOST:PORT or ray://HOST:PORT")
    _check(c.nodes == "auto" or (isinstance(c.nodes, int) and not isinstance(c.nodes, bool) and c.nodes >= 1)
           or (isinstance(c.nodes, str) and bool(c.nodes)), "cluster.nodes",
           f"must be auto, a number of nodes >= 1 or a resource label, got {c.nodes!r}")
    _check(c.cpus_per_server >= 0, "cluster.cpus_per_server", f"must be >= 0, got {c.cpus_per_server}")
    _check(c.gpus_per_server == "auto" or (isinstance(c.gpus_per_server, (int, float)) and c.gpus_per_server >= 0),
           "cluster.gpus_per_server", f"must be auto or a number >= 0, got {c.gpus_per_server!r}")
    _check(c.max_restarts >= -1, "cluster.max_restarts", f"must be >= -1 (-1 = without limit), got {c.max_restarts}")
    _check(c.start_timeout_s > 0, "cluster.start_timeout_s", "must be > 0")
    _check(c.directory_host in HOSTS, "cluster.directory_host",
           f"must be one of {', '.join(HOSTS)}, got {c.directory_host!r}")
    _check(c.directory_port == 0 or 1024 <= c.directory_port <= 65535, "cluster.directory_port",
           f"must be 1024..65535, or 0 for any free port, got {c.directory_port}")
    _check(c.poll_interval_s > 0, "cluster.poll_interval_s", "must be > 0")
    _check(c.drop_after_s >= c.poll_interval_s, "cluster.drop_after_s", "must be >= cluster.poll_interval_s")
