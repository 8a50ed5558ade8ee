"""What the schedulers take from diffusers where it is installed, written small for where it is not.

With diffusers importable, :mod:`vlfast.schedulers._base` builds the schedulers on diffusers' own
``SchedulerMixin``, ``ConfigMixin``, ``register_to_config`` and ``BaseOutput``, so that pipelines save,
load and convert them as they do diffusers' schedulers. Without it, these equivalents keep the same
surface for local use: ``config`` (a read-only dict also read as attributes), ``register_to_config``,
``from_config`` (with diffusers' ``_use_default_values`` rule), ``save_config`` / ``save_pretrained`` /
``from_pretrained`` of a local folder, ``compatibles``, config entries read as attributes of the
scheduler (with diffusers' FutureWarning) and step outputs indexable like tuples and dicts. Nothing
here reaches the Hugging Face Hub.
"""

import functools
import inspect
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import fields, is_dataclass

import torch.utils._pytree as pytree

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class FrozenDict(dict):
    """The constructor arguments, read-only: ``config.clip_sample`` or ``config["clip_sample"]``."""

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        object.__setattr__(self, "__dict__", self)  # config.name is a plain attribute lookup (fast)

    def __getattr__(self, name):
        raise AttributeError(f"config has no entry {name!r}")

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; make a new scheduler with from_config(config, **changes)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):
        return FrozenDict, (dict(self),)


def _init_keys(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters)


class ConfigMixin:
    """diffusers.ConfigMixin's surface: the config, its JSON file and ``from_config``."""

    config_name = None
    ignore_for_config: list = []
    has_compatibles = False

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    def register_to_config(self, **kwargs) -> None:
        """Add ``kwargs`` to the config (diffusers' ``ConfigMixin.register_to_config``)."""
        kwargs.pop("kwargs", None)
        self._internal_dict = FrozenDict({**self.__dict__.get("_internal_dict", {}), **kwargs})

    def __getattr__(self, name):
        """A config entry read as an attribute, with diffusers' deprecation warning."""
        internal = self.__dict__.get("_internal_dict")
        if internal is not None and name in internal:
            warnings.warn(f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute "
                          f"is deprecated. Please access '{name}' over '{type(self).__name__}'s config object "
                          f"instead, e.g. 'scheduler.config.{name}'.", FutureWarning, stacklevel=2)
            return internal[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """An instance from a config dict (ours or another scheduler's); ``kwargs`` override it.

        Entries the source scheduler left at its defaults (``_use_default_values``) take this class's
        defaults, as in diffusers' ``from_config``.
        """
        if config is None:
            raise ValueError("Please make sure to provide a config as the first positional argument.")
        if not isinstance(config, dict):
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        init_dict, unused, hidden = cls.extract_init_dict(config, **kwargs)
        model = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        model.register_to_config(**hidden)
        unused = {**unused, **hidden}
        return (model, unused) if return_unused_kwargs else model

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """(constructor arguments, unused entries, entries not passed to the constructor), by diffusers' rules."""
        used_defaults = config_dict.get("_use_default_values", [])
        config_dict = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config_dict)
        expected = _init_keys(cls) - {"self", "kwargs"} - set(cls.ignore_for_config)
        others = set()
        for c in cls._get_compatibles() if cls.has_compatibles else ():
            others |= _init_keys(c)
        config_dict = {k: v for k, v in config_dict.items() if k not in others - _init_keys(cls)}
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        init_dict = {}
        for key in expected:
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
                config_dict.pop(key, None)
            elif key in config_dict:
                init_dict[key] = config_dict.pop(key)
        unused = {**config_dict, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs):
        """The config dict of a local JSON file, or of ``config_name`` in a local folder (or its ``subfolder``)."""
        path = str(pretrained_model_name_or_path)
        subfolder = kwargs.pop("subfolder", None) or ""
        if os.path.isfile(path):
            config_file = path
        elif os.path.isfile(os.path.join(path, subfolder, cls.config_name)):
            config_file = os.path.join(path, subfolder, cls.config_name)
        elif os.path.isdir(path):
            raise EnvironmentError(f"Error no file named {cls.config_name} found in directory {path}.")
        else:
            raise EnvironmentError(f"{path} is not a local folder or file (loading from the Hugging Face Hub "
                                   "needs diffusers installed)")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        outputs = (config,) + ((kwargs,) if return_unused_kwargs else ()) + ((None,) if return_commit_hash else ())
        return outputs if len(outputs) > 1 else config

    def to_json_string(self) -> str:
        config = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in self._internal_dict.items()}
        config["_class_name"] = type(self).__name__
        config.pop("_use_default_values", None)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``config_name`` (JSON) into ``save_directory``, created if needed."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub needs diffusers installed")
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, self.config_name))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class SchedulerMixin:
    """diffusers.SchedulerMixin's surface: save and load a scheduler's config, its compatible classes."""

    config_name = SCHEDULER_CONFIG_NAME
    _compatibles: list = []
    has_compatibles = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=True, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def compatibles(self) -> list:
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls) -> list:
        return [cls]


def register_to_config(init):
    """Decorator of ``__init__``: every argument (defaults included) goes to the config, and the names left
    at their defaults to ``_use_default_values`` (diffusers' ``register_to_config``)."""

    @functools.wraps(init)
    def inner_init(self, *args, **kwargs):
        init_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        ignore = getattr(self, "ignore_for_config", [])
        params = {name: p.default for i, (name, p) in enumerate(inspect.signature(init).parameters.items())
                  if i > 0 and name not in ignore}
        config = dict(zip(params, args))
        config.update({k: init_kwargs.get(k, default) for k, default in params.items() if k not in config})
        defaults = set(config) - set(init_kwargs)
        if defaults:
            config["_use_default_values"] = list(defaults)
        self.register_to_config(**private, **config)
        init(self, *args, **init_kwargs)

    return inner_init


class BaseOutput(OrderedDict):
    """diffusers.utils.BaseOutput: a dataclass whose fields that are not None are also dict entries;
    ``out[0]``, ``out["prev_sample"]``, ``out.prev_sample`` and ``out.to_tuple()`` all work."""

    def __init_subclass__(cls) -> None:
        pytree.register_pytree_node(cls, pytree._dict_flatten,
                                    lambda values, context: cls(**pytree._dict_unflatten(values, context)),
                                    serialized_type_name=f"{cls.__module__}.{cls.__name__}")

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def _frozen(self, *args, **kwargs):
        raise Exception(f"You cannot use this method on a {type(self).__name__} instance.")

    __delitem__ = setdefault = pop = update = _frozen

    def __getitem__(self, k):
        if isinstance(k, str):
            return dict(self.items())[k]
        return self.to_tuple()[k]

    def __setattr__(self, name, value) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        if not is_dataclass(self):
            return super().__reduce__()
        callable_, _args, *rest = super().__reduce__()
        return (callable_, tuple(getattr(self, f.name) for f in fields(self)), *rest)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())
