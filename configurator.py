"""
Override-style configuration, nanoGPT's way.

A script keeps its settings as flat, typed module-level defaults (`DEFAULTS = defaults(globals())` collects
them). `configure` takes those defaults and the command line, and returns the resolved settings:

    python train.py config/e2e_layer6.py --batch_size=4 --lr=1e-4

Each argument without `--` is a config file: plain Python whose top-level assignments override the defaults.
Each `--key=value` then overrides one setting; the value is read as a Python literal (`--sae_positions=
"['blocks.2.hook_resid_pre']"`) and otherwise taken as a string (`--device=cuda`). Anything that is not a known
key of the right type stops the program before it does any work, with a message that says what to fix.
"""

import ast
import difflib
import os
import sys
import types


class ConfigError(SystemExit):
    """A bad setting: exits with status 1 and the message on stderr."""

    def __init__(self, message):
        super().__init__(f"config error: {message}")


def _coerce(key, value, default, source):
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # lr = 1 means 1.0
    if type(value) is not type(default):
        raise ConfigError(f"{key} expects {type(default).__name__} (default {default!r}), but {source} gives "
                          f"{type(value).__name__} {value!r}")
    return value


def defaults(scope):
    """A script's settings: the typed module-level values of its globals() (int, float, bool, str, list), in order.
    Names starting with an underscore and upper-case constants are not settings."""
    return {k: v for k, v in scope.items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, (int, float, bool, str, list))}


def configure(defaults, argv, given=None):
    """Apply config files and --key=value overrides from argv to a dict of typed defaults; return the result.
    `given`, a set, receives the keys that a config file or an override set (a default that depends on another
    setting applies only where its key was not given)."""
    config = dict(defaults)
    given = set() if given is None else given
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} does not exist")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            pairs = [(key, value) for key, value in scope.items() if not key.startswith("_")
                     and not isinstance(value, (types.ModuleType, types.FunctionType, type))]
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg} should be --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # --init_from=123 names a directory called 123
            pairs = [(key, value)]
        for key, value in pairs:
            if key not in defaults:
                close = difflib.get_close_matches(key, defaults, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(defaults))}"
                raise ConfigError(f"unknown key {key!r} in {arg}{hint}")
            config[key] = _coerce(key, value, defaults[key], arg)
            given.add(key)
    return config


def check_settings(config, rules):
    """Check settings against a table of rules, (key, test, what the value must be), in order; raise ConfigError
    naming the first setting that fails. One table per script keeps every range in one place."""
    for key, test, must in rules:
        if not test(config[key]):
            raise ConfigError(f"{key} must be {must}, got {config[key]!r}")


def default_device():
    """The device a script runs on unless told: the GPU where there is one."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# the rule every script's settings table has for its `device`
device_rule = ("device", lambda d: not d.startswith("cuda") or default_device() == "cuda",
               "'cpu': no CUDA GPU is available")


def print_config(config, file=sys.stdout):
    width = max(map(len, config))
    for key, value in config.items():
        print(f"  {key:<{width}} = {value!r}", file=file)
