"""The command line, checked before Hydra runs the job: a mistyped key gets a "did you mean", and an unwritable
run.storage_path is refused before Hydra tries to create its output directory there (which fails with a traceback).
Multirun sweeps and alternative config directories go straight to Hydra."""

from distft.config.compose import compose
from distft.config.explain import added_keys_problem, explain, unknown_keys

# Hydra flags after which the whole command is Hydra's own business (help, completion, sweeps, other configs).
HYDRA_ONLY = {"-h", "--help", "--hydra-help", "--version", "-sc", "--shell-completion", "-m", "--multirun",
              "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--experimental-rerun"}
TAKES_VALUE = {"-c", "--cfg", "-p", "--package", "-i", "--info"}


# Config choices that need an optional extra: (override, module it needs, extra).
EXTRAS = (("hydra/launcher=ray_tasks", "hydra_plugins.hydra_ray_launcher", "sweep"),)


def missing_extra(args: list[str]) -> str | None:
    for choice, module, extra in EXTRAS:
        if choice in args and not _importable(module):
            return f"{choice} needs the '{extra}' extra: `pip install 'distft[{extra}]'`"
    return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def command_line_problem(args: list[str]) -> tuple[str | None, bool]:
    """(what is wrong with these arguments, or None; whether Hydra will only print the config, making no dirs)."""
    extra = missing_extra(args)
    if extra:
        return extra, False
    overrides, prints_only, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in HYDRA_ONLY:
            return None, True
        if flag in TAKES_VALUE:
            prints_only, skip = True, "=" not in arg
            continue
        if arg.startswith("-") or arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        overrides.append(arg)
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf errors; anything else is Hydra's to report
        return explain(e, overrides), prints_only
    added = unknown_keys(cfg)
    if added:  # `+group.key=...` adds a key the typed schema does not have, and nothing would ever read it
        return added_keys_problem(added), prints_only
    return None if prints_only else _storage_problem(cfg), prints_only


def _storage_problem(cfg) -> str | None:
    from distft.errors import UserError
    from distft.precheck import check_storage

    try:
        check_storage(cfg.run.storage_path)
    except UserError as e:
        return str(e)
    return None
