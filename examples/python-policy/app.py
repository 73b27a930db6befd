"""python-policy: a gpulet power policy written in Python.

The same policy as the Rust template (`gpulet plugin new`): a GPU whose utilisation is
below `idle_util_pct` is parked at `idle_limit_w` (default: its lowest limit), a busy one
gets its highest limit. A GPU without a utilisation reading gets no action, so the host
gives it its upper bound, as to any GPU no policy proposes for: what a busy one gets.

Config (JSON, all optional, strict): `{"idle_util_pct": 5, "idle_limit_w": 200}`.
It needs the grants `lower` and `raise`.

The policy is two plain functions, `parse_config` and `decide`, that know nothing of
WebAssembly: `python3 -m unittest` tests them with CPython alone. `WitWorld` at the bottom
is the glue that componentize-py wires to the `power` world's exports.
"""

import json
import math
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

NAME = "python-policy"
VERSION = "0.1.0"
# The contract this was built against (wit/v0.1.2); the host requires major.minor 0.1.
API_VERSION = "0.1.2"

DEFAULT_IDLE_UTIL_PCT = 5.0


class Config(NamedTuple):
    idle_util_pct: float = DEFAULT_IDLE_UTIL_PCT
    # None: park an idle GPU at its own `min-limit-w`.
    idle_limit_w: Optional[float] = None


class Decision(NamedTuple):
    gpu: int
    limit_w: float
    reason: str


class ConfigProblem(NamedTuple):
    path: str
    message: str


class InvalidConfig(Exception):
    def __init__(self, problems: List[ConfigProblem]):
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity/-Infinity; JSON (and serde) does not.
    raise ValueError(f"{name} is not JSON")


def _object_no_duplicates(pairs: List[Tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _is_number(v: Any) -> bool:
    # bool is an int in Python; `true` is not a number in JSON.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_config(text: str) -> Config:
    """Parse and check the config strictly; raises InvalidConfig whose problems name
    their JSON paths (`$` for the document, `$.key` for a key)."""
    if not text.strip():
        text = "{}"
    try:
        doc = json.loads(
            text,
            parse_constant=_reject_constant,
            object_pairs_hook=_object_no_duplicates,
        )
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise InvalidConfig([ConfigProblem("$", f"not valid JSON: {e}")]) from None
    if not isinstance(doc, dict):
        raise InvalidConfig([ConfigProblem("$", "accepted: a JSON object")])

    problems: List[ConfigProblem] = []
    known = ("idle_util_pct", "idle_limit_w")
    for key in doc:
        if key not in known:
            problems.append(
                ConfigProblem(
                    f"$.{key}",
                    "unknown key; accepted: " + ", ".join(known),
                )
            )

    idle_util_pct = DEFAULT_IDLE_UTIL_PCT
    if "idle_util_pct" in doc:
        v = doc["idle_util_pct"]
        if not _is_number(v):
            problems.append(
                ConfigProblem("$.idle_util_pct", "accepted: a number from 0 to 100 (%)")
            )
        elif not 0.0 <= v <= 100.0:
            problems.append(
                ConfigProblem(
                    "$.idle_util_pct", f"{v} is out of range; accepted: 0 to 100 (%)"
                )
            )
        else:
            idle_util_pct = float(v)

    idle_limit_w = None
    v = doc.get("idle_limit_w")
    if v is not None:
        if not _is_number(v):
            problems.append(
                ConfigProblem("$.idle_limit_w", "accepted: a positive number of watts")
            )
        elif not 0 < v < math.inf:
            problems.append(
                ConfigProblem(
                    "$.idle_limit_w",
                    f"{v} is out of range; accepted: a positive number of watts",
                )
            )
        else:
            idle_limit_w = float(v)

    if problems:
        raise InvalidConfig(problems)
    return Config(idle_util_pct, idle_limit_w)


def decide(config: Config, gpus: Sequence[Any]) -> List[Decision]:
    """The policy: a limit for every GPU with a utilisation reading.

    `gpus` are anything with the snapshot's GPU attributes (`index`, `util_pct`,
    `min_limit_w`, `max_limit_w`): the bindings' `types.Gpu` in the component, a
    NamedTuple in the tests."""
    out: List[Decision] = []
    for g in gpus:
        util = g.util_pct
        if util is None:
            continue
        if util < config.idle_util_pct:
            w = config.idle_limit_w if config.idle_limit_w is not None else g.min_limit_w
            w = min(max(w, g.min_limit_w), g.max_limit_w)
            reason = (
                f"idle ({util:.0f} % < {config.idle_util_pct:.0f} %): "
                f"parked at {w:.0f} W"
            )
        else:
            w = g.max_limit_w
            reason = f"busy ({util:.0f} %): its highest limit"
        out.append(Decision(g.index, w, reason))
    return out


# ---------------------------------------------------------------------------------------
# The component's glue. `wit_world` exists only inside componentize-py's build (it
# generates it from the WIT); under plain CPython (the unit tests) it is absent and
# `WitWorld` is never called.
try:
    from componentize_py_types import Err
    from wit_world.imports import host, types
except ImportError:  # plain CPython: no bindings
    host = types = Err = None  # type: ignore[assignment]

# The config `init` was given. An instance is re-made (and `init` called again) after a
# fault, so nothing else needs keeping.
_config: Optional[Config] = None


class WitWorld:
    def info(self) -> "types.PluginInfo":
        return types.PluginInfo(name=NAME, version=VERSION, api_version=API_VERSION)

    def validate_config(self, config: str) -> None:
        try:
            parse_config(config)
        except InvalidConfig as e:
            raise Err([types.ConfigError(path=p.path, message=p.message) for p in e.problems])

    def init(self, config: str, gpus: List["types.GpuInfo"]) -> None:
        global _config
        try:
            c = parse_config(config)
        except InvalidConfig as e:
            raise Err(str(e))
        host.log(host.Level.INFO, f"started on {len(gpus)} GPUs with {c}")
        _config = c

    def decide_power(self, snapshot: "types.Snapshot") -> List["types.PowerAction"]:
        if _config is None:
            return []
        return [
            types.PowerAction(gpu=d.gpu, limit_w=d.limit_w, reason=d.reason)
            for d in decide(_config, snapshot.gpus)
        ]
