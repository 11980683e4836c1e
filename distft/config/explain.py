"""Hydra's composition errors said plainly, with the nearest valid key or group option for a misspelling, and the
keys a `+key=...` override added that the typed schema does not declare. Used by the command line and by compare
arms (whose overrides are composed again)."""

import difflib

from omegaconf import OmegaConf

from distft.config.compose import CONF_DIR


def explain(error: Exception, overrides: list[str]) -> str:
    """Hydra's message, with the nearest valid key or group option when the problem is a misspelling."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    message = str(error).strip()
    if cause is not error:
        message += "\n" + str(cause).strip()
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key and "not in" in str(cause):
        if (open_dict := _open_dict(full_key)) is not None:
            given = next((o for o in overrides if o.split("=", 1)[0] == open_dict or
                          o.split("=", 1)[0].startswith(f"{open_dict}.")), f"{open_dict}={{...}}")
            return (f"{open_dict} takes any keys, but a dict that the config does not hold yet is added with a "
                    f"leading +: write +{given}")
        parent = full_key.rpartition(".")[0]
        keys = _keys(parent)
        close = nearest_keys(full_key, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (f"unknown config key {full_key}: {hint}valid keys of {parent or 'the config'}: {', '.join(keys)} "
                "(`python -m distft.train --cfg job` prints the whole config)")
    if isinstance(cause, ValidationError) and full_key:
        expected = getattr(cause, "msg", str(cause)).splitlines()[0]
        return f"{full_key}: {expected} (check the value given on the command line)"
    missing = _missing_group_option(str(error))
    if missing:
        group, option = missing
        options = _options(group)
        close = difflib.get_close_matches(option, options, n=2, cutoff=0.5)
        hint = f"did you mean {group}={' or '.join(close)}? " if close else ""
        return f"{group}={option} is not a config in distft/conf/{group}/: {hint}choices: {', '.join(options)}"
    return f"{message}\n(in the command-line overrides: {' '.join(overrides)})"


def _open_dict(full_key: str) -> str | None:
    """The free-form dict of the schema (strategy.deepspeed, run.env) that `full_key` lies in, or None."""
    from distft.config.schema import TrainConfig

    node, path = OmegaConf.structured(TrainConfig), []
    for part in full_key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return None
        node, path = node[part], [*path, part]
        if OmegaConf.is_dict(node) and OmegaConf.get_type(node) is dict:
            return ".".join(path)
    return None


def _keys(parent: str) -> list[str]:
    """The keys the typed schema declares under `parent` (every group choice has the same ones)."""
    from distft.config.schema import TrainConfig

    node = OmegaConf.structured(TrainConfig)
    for part in filter(None, parent.split(".")):
        node = node[part]
    return sorted(node.keys()) if OmegaConf.is_dict(node) else []


def _missing_group_option(message: str) -> tuple[str, str] | None:
    """(group, option) from Hydra's "Could not find 'group/option'"."""
    marker = "Could not find '"
    if marker not in message:
        return None
    target = message.split(marker, 1)[1].split("'", 1)[0]
    group, _, option = target.rpartition("/")
    return (group, option) if group else None


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def unknown_keys(cfg, schema=None, prefix: str = "") -> list[str]:
    """Keys of `cfg` that its typed schema (distft/config/schema.py) does not declare; free-form dicts are skipped."""
    from dataclasses import is_dataclass

    from distft.config.schema import TrainConfig

    schema = OmegaConf.structured(TrainConfig) if schema is None else schema
    if not is_dataclass(OmegaConf.get_type(schema)):
        return []
    found = []
    for key in cfg:
        if key not in list(schema.keys()):
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(cfg[key]) and OmegaConf.is_dict(schema[key]):
            found += unknown_keys(cfg[key], schema[key], f"{prefix}{key}.")
    return found


def nearest_keys(key: str, n: int = 2) -> list[str]:
    """The schema's keys nearest to a misspelled dotted `key`, as dotted keys."""
    parent, _, leaf = key.rpartition(".")
    return [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, _keys(parent), n=n, cutoff=0.6)]


def added_keys_problem(keys: list[str]) -> str:
    parts = []
    for key in keys:
        close = nearest_keys(key, n=1)
        parts.append(f"unknown config key {key}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(parts) + ": remove the leading + or fix the name"
