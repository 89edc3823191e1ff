"""The flags that make a recorded result again as it was made: what a "re-run ..." hint must carry.

``diffmine status``, the stale reasons (:func:`lineage.stale_reasons`) and a refused change of
settings (:func:`lineage.plan`) name a command to run. Without the flags a result was made with,
that command makes a cheap result again with the defaults (a ``mine --top 40`` silently becomes
``--top 1000``) and leads an expensive one into a refusal. The flags come from the result's
recorded settings through the CLI's own mapping, one option per config field (:func:`flag`,
``flags.add_config``): a new field gets its flag here for free. Only values that differ from the
CLI's defaults are given, and none that the step resolves from the others anyway (typicality's
``samples``; a ``precision`` of ``auto``, which keeps the stored result's).

A received run's lineage.json is text anyone could have edited: only a field of the command's
configs, with a value of the field's kind, becomes words, each shlex-quoted (and a value that
starts with ``-`` written ``--flag=VALUE``, never read as an option), so what is printed runs
``diffmine <step> ...`` and nothing else.

This module imports no other module of diffmine at its top, so that ``lineage`` and ``flags`` can
both import it; the configs are imported when a command is asked for (their modules import the run
directory, which imports ``lineage``).
"""

from __future__ import annotations

import dataclasses
import shlex

# settings that are plain flags of a command's parser (not a config's fields): (result, keys), by command
PLAIN = {"trends": ("trends", ("order",)), "baseline doersch": ("baseline-doersch", ("positive",)),
         "localize": ("localize", ("blur",))}
# files and folders given to a command, by command: (result, keys of the record's "paths", where they
# were read from; the settings hold their content's digest). A record made before paths were kept
# holds the path itself in its settings.
GIVEN_PATHS = {"report": ("report", ("masks",)), "localize": ("localize", ("boxes", "masks", "before"))}


def flag(name: str, prefix: str = "") -> str:
    """The option of config field ``name``: ``t_min`` -> ``--t-min`` (``feature-`` prefix: ``--feature-t``)."""
    return "--" + (prefix + name).replace("_", "-").lower()


def field_kind(field: dataclasses.Field):
    """int, float, str or bool from a field's annotation (``int | None`` -> int); None for another (a tuple)."""
    return {"int": int, "float": float, "str": str, "bool": bool}.get(str(field.type).split(" ")[0].split("|")[0].strip())


def command_configs(command: str) -> tuple:
    """What the flags of ``diffmine COMMAND`` set, as cli.py's parser adds them: (result, key of the
    result's settings that holds the config's fields or None, config, flag prefix, fields without a
    flag). ``{}`` in a result stands for the contrast's own name. Commands not here (``prepare``,
    ``localize``, whose flags are :data:`PLAIN`) get none from a config. ``train`` trains on the images the run lists (no ``--data``); its
    model's ``steps`` and ``model_options`` are no config fields: :func:`train_words`."""
    from .adaptive import AdaptiveConfig
    from .baselines.doersch import DoerschConfig
    from .classify import NO_FLAGS as CLASSIFY_NO_FLAGS
    from .classify import ClassifyConfig
    from .clustering import ClusterConfig
    from .contrast import ContrastConfig
    from .cotypicality import CotypicalityConfig
    from .features import FeatureConfig
    from .mining import MineConfig
    from .report import ReportConfig
    from .translate import TranslateConfig
    from .train import TrainConfig
    from .trends import TrendsConfig
    from .typicality import TypicalityConfig

    return {
        "train": (("model", None, TrainConfig, "", ()),),
        "typicality": (("typicality", None, TypicalityConfig, "", ()),
                       ("typicality", "adaptive", AdaptiveConfig, "adaptive-", ())),
        "mine": (("mine", None, MineConfig, "", ()),),
        "cluster": (("features", None, FeatureConfig, "feature-", ()), ("cluster", None, ClusterConfig, "", ())),
        "report": (("report", None, ReportConfig, "", ()),),
        "classify": (("classify", None, ClassifyConfig, "", CLASSIFY_NO_FLAGS),),
        "translate": (("translate", None, TranslateConfig, "", ()),),
        "cotypicality": (("cotypicality", None, CotypicalityConfig, "", ()),
                         ("cotypicality", "features", FeatureConfig, "feature-", ())),
        "contrast": (("{}", None, ContrastConfig, "", ()), ("{}-elements", "mine", MineConfig, "", ()),
                     ("{}-elements", "cluster", ClusterConfig, "", ()),
                     ("{}-elements", "features", FeatureConfig, "feature-", ())),
        "trends": (("trends", None, TrendsConfig, "", ()),),
        "baseline doersch": (("baseline-doersch", None, DoerschConfig, "", ()),),
    }.get(command, ())


def gives_settings(command: str) -> bool:
    """Can :func:`command_flags` give ``diffmine COMMAND`` its results' settings?"""
    return bool(command_configs(command))


def command_flags(command: str, name: str, records: dict) -> list[str]:
    """The words (shell-quoted) that give ``diffmine COMMAND`` the settings ``records`` hold for the
    results it makes, re-making result ``name``: ``["--top", "40"]``."""
    base = name.removesuffix("-elements")  # a contrast's maps and elements: one command
    words, given = [], set()
    for result, key, config, prefix, fixed in command_configs(command):
        settings = _settings(records, result.format(base), key)
        if command == "train":  # the steps trained are recorded beside the model's settings
            steps = (records.get("model") or {}).get("steps")
            settings = {**settings, **({"steps": steps} if isinstance(steps, int) else {})}
        for option, value_words in config_words(config, settings, prefix, fixed):
            if option not in given:  # --seed sets every config's seed
                given.add(option)
                words += value_words
    if command == "typicality":
        words += outside_model_words(records.get("typicality"))
    if command == "train":
        words += train_words(records.get("model"))
    result, keys = PLAIN.get(command, (None, ()))
    settings = _settings(records, result, None) if result else {}
    for key in keys:
        value = settings.get(key)
        if isinstance(value, list) and all(isinstance(v, str) and "," not in v for v in value) and value:
            value = ",".join(value)  # trends --order L1,L2,...
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            value = repr(value)  # localize --blur 1.5 (0, its default, left out)
        if isinstance(value, str) and value:
            words += _words(flag(key), value)
    result, keys = GIVEN_PATHS.get(command, (None, ()))
    record = records.get(result) if result else None
    paths = record.get("paths") if isinstance(record, dict) else None
    paths = paths if isinstance(paths, dict) else _settings(records, result, None) if result else {}
    for key in keys:
        if isinstance(paths.get(key), str) and paths[key]:
            words += _words(flag(key), paths[key])
    return words


def train_words(record) -> list[str]:
    """``--lora-rank`` and ``--text-encoder`` of a trained model's ``model_options``, as ``train``
    was given them (no config's fields: ``cli._sd_args``). [] for a record without them."""
    settings = record.get("settings") if isinstance(record, dict) else None
    options = settings.get("model_options") if isinstance(settings, dict) else None
    if not isinstance(options, dict):
        return []
    rank, encoder = options.get("lora_rank"), options.get("text_encoder")
    return ((_words("--lora-rank", rank) if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else [])
            + (_words("--text-encoder", encoder) if isinstance(encoder, str) and encoder else []))


def outside_model_words(record) -> list[str]:
    """``--model`` (and ``--text-encoder``) of a typicality result scored with a model other than
    the run's own, as ``typicality --model`` was given them: a local folder from where the record
    says it was read (its ``location``, kept outside the identity; a folder whose files changed is
    refused by the step), a hub id as recorded. [] for the run's own model, or a record without one."""
    from .pipeline import LOCAL  # the name a record gives a local folder, in place of its path

    settings = record.get("settings") if isinstance(record, dict) else None
    model = settings.get("model") if isinstance(settings, dict) else None
    if not isinstance(model, str) or model == "run" or ":" not in model:
        return []
    location = record.get("location") if isinstance(record.get("location"), dict) else {}
    options = settings.get("model_options") if isinstance(settings.get("model_options"), dict) else {}
    kind, name = model.split(":", 1)
    named = {"--model": (f"{kind}:{location.get('base')}" if isinstance(location.get("base"), str) else None)
             if name == LOCAL else model,
             "--text-encoder": location.get("text_encoder") if options.get("text_encoder") == LOCAL
             else options.get("text_encoder")}
    return [word for option, value in named.items() if isinstance(value, str) and value for word in _words(option, value)]


def _settings(records: dict, result: str, key: str | None) -> dict:
    """The recorded settings of ``result`` (those under ``key``); {} where there are none."""
    record = records.get(result)
    settings = record.get("settings") if isinstance(record, dict) else None
    if key is not None and isinstance(settings, dict):
        settings = settings.get(key)
    return settings if isinstance(settings, dict) else {}


def config_words(config, settings: dict, prefix: str = "", fixed: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """``[(option, words), ...]`` giving the dataclass ``config``'s fields the values in ``settings``,
    as ``flags.add_config(parser, config, prefix)`` reads them (``--seed`` unprefixed, from
    ``add_run_args``). Left out: keys that are no field of it (derived values, anything unknown),
    ``fixed`` fields, values equal to the CLI's default, values not of the field's kind, ``None``
    where the default is not (no flag gives it), and values the config refuses."""
    fields = {f.name: f for f in dataclasses.fields(config) if f.name not in fixed}
    given = {}
    for name, value in settings.items():
        field = fields.get(name)
        if field is None or field.default is dataclasses.MISSING:
            continue
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        # "auto" is resolved by the step to the stored result's value (pipeline._resolved): the same result
        if default == "auto" or value == default or not _of_kind(field, value):
            continue
        given[name] = value
    if given and not _built(config, given):  # refused by the config (an edited record): less what it refuses alone
        given = {name: value for name, value in given.items() if _built(config, {name: value})}
    out = []
    for name, value in _unresolved(config, given).items():
        option = flag(name, "" if name == "seed" else prefix)
        if isinstance(value, bool):
            out.append((option, [option if value else "--no-" + option[2:]]))
        elif isinstance(value, list):
            out.append((option, [option, *(shlex.quote(str(v)) for v in value)]))
        else:
            out.append((option, _words(option, value)))
    return out


def _words(option: str, value) -> list[str]:
    """``--option VALUE`` quoted; ``--option=VALUE`` where the value starts with ``-`` (a negative
    number, or an edited record's ``--force``: never taken for an option)."""
    text = str(value)
    return [shlex.quote(f"{option}={text}")] if text.startswith("-") else [option, shlex.quote(text)]


def _of_kind(field: dataclasses.Field, value) -> bool:
    """Is ``value`` one the field's flag can give (a plain str, int, float or bool, or a list for a tuple)?"""
    if isinstance(field.default, tuple):
        return isinstance(value, list) and bool(value) and all(
            (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, str) and not v.startswith("-"))
            for v in value)
    kind = field_kind(field)
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if kind is int or kind is float:
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return False


def _unresolved(config, given: dict) -> dict:
    """``given`` less the values that the config built from the others resolves to anyway
    (TypicalityConfig: ``samples`` None -> 16, 64 with ``--estimator adaptive``; a preset's sizes)."""
    kept = dict(given)
    for name in given:
        if _built(config, {k: v for k, v in kept.items() if k != name}).get(name) == given[name]:
            del kept[name]
    whole = _built(config, kept)
    return kept if all(whole.get(k) == v for k, v in given.items()) else given


def _built(config, values: dict) -> dict:
    """The fields of ``config(**values)`` after its own resolution; {} where it refuses them."""
    try:
        built = dataclasses.asdict(config(**values))
    except (TypeError, ValueError):
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in built.items()}
