"""Plugin discovery and the component registry.

Plugins are found through the ``fedmedbench`` entry-point group (built-ins
included, from this project's own ``pyproject.toml``), then in the modules
named by ``FEDMEDBENCH_PLUGINS`` (comma-separated import paths, for a plugin
not packaged yet). ``FEDMEDBENCH_DISABLE_PLUGINS`` (comma-separated plugin
names) blocks plugins.

Loading never ends in a raw traceback: an installed plugin that cannot be
imported is named with its distribution, its entry point and the
``FEDMEDBENCH_DISABLE_PLUGINS`` setting that skips it; a hook implementation
whose name is not a hook gets a did-you-mean; a component whose constructor
raises is named with its plugin.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from fedmedbench import hookspecs
from fedmedbench.components import FAMILIES, Component
from fedmedbench.constraints import check_values, rules_of
from fedmedbench.errors import ConfigError, PluginConflictError

hookimpl = pluggy.HookimplMarker("fedmedbench")

#: matrix words meaning "no component" on optional axes
NONE = "none"

_HOOK_OF_FAMILY = {
    "dataset": "register_datasets",
    "partitioner": "register_partitioners",
    "model": "register_models",
    "algorithm": "register_algorithms",
    "aggregator": "register_aggregators",
    "privacy": "register_privacy",
    "compressor": "register_compressors",
    "adversary": "register_adversaries",
    "attack": "register_attacks",
    "reporter": "register_reporters",
    "network": "register_networks",
}


@dataclass(frozen=True)
class ComponentInfo:
    family: str
    name: str
    cls: type[Component]
    plugin: str
    distribution: str
    version: str

    @property
    def doc(self) -> str:
        """The first paragraph of the class docstring, on one line."""
        text = (self.cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(text.split()).replace(":class:", "")


class Registry:
    """All components of all plugins, by family and name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._by_name: dict[str, ComponentInfo] = {}
        dists = {id(p): (d.metadata["name"], d.version) for p, d in pm.list_plugin_distinfo()}
        for family, hook in _HOOK_OF_FAMILY.items():
            for impl in getattr(pm.hook, hook).get_hookimpls():
                pname = impl.plugin_name
                dist, version = dists.get(id(impl.plugin), ("(not installed)", ""))
                if dist == "fedmedbench":  # the one version number, even before a reinstall
                    from fedmedbench import __version__

                    version = __version__

                def register(cls: type[Component], _f: str = family, _p: str = pname,
                             _d: str = dist, _v: str = version) -> type[Component]:
                    self._add(_f, cls, _p, _d, _v)
                    return cls

                try:
                    impl.function(register=register)
                except (PluginConflictError, ConfigError):
                    raise
                except Exception as exc:
                    raise ConfigError(
                        f"plugin {pname!r} ({dist}) raised in {hook}: {type(exc).__name__}: {exc}"
                    ) from exc

    def _add(self, family: str, cls: type[Component], pname: str, dist: str, version: str) -> None:
        base = FAMILIES[family]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(
                f"plugin {pname!r} ({dist}) registered {cls!r} as a {family}, but it is not a "
                f"subclass of harness.{base.__name__}"
            )
        name = getattr(cls, "name", "")
        if not name or not isinstance(name, str):
            raise ConfigError(f"plugin {pname!r} ({dist}) registered {cls.__name__} without a `name`")
        if not name.isprintable() or any(c.isspace() for c in name):
            raise ConfigError(
                f"plugin {pname!r} ({dist}) registered {cls.__name__} as {ascii(name)}: a "
                f"component name may not hold a control character or white space (it is "
                f"printed on terminals and written into reports); rename it")
        if name == NONE:
            raise ConfigError(f"plugin {pname!r} ({dist}): 'none' is reserved, pick another name")
        if name in self._by_name:
            other = self._by_name[name]
            raise PluginConflictError(
                f"component name {name!r} is registered twice: by plugin {other.plugin!r} "
                f"(distribution {other.distribution}) as a {other.family}, and by plugin "
                f"{pname!r} (distribution {dist}) as a {family}. Names are unique across all "
                f"plugins: rename one, or block a plugin with FEDMEDBENCH_DISABLE_PLUGINS={pname}"
            )
        cls.plugin, cls.distribution, cls.version = pname, dist, version
        self._by_name[name] = ComponentInfo(family, name, cls, pname, dist, version)

    # -- queries -------------------------------------------------------------

    def all(self, family: str | None = None) -> list[ComponentInfo]:
        items = sorted(self._by_name.values(), key=lambda i: (i.family, i.name))
        return [i for i in items if family is None or i.family == family]

    def names(self, family: str) -> list[str]:
        return [i.name for i in self.all(family)]

    def get(self, family: str, name: str, *, key: str | None = None) -> ComponentInfo:
        info = self._by_name.get(name)
        if info is not None and info.family == family:
            return info
        where = f"{key}: " if key else ""
        if info is not None:
            raise ConfigError(
                f"{where}{name!r} is a {info.family}, not a {family}. "
                f"{family}s: {', '.join(self.names(family)) or '(none installed)'}"
            )
        choices = self.names(family)
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{where}no {family} {name!r}; {hint}known {family}s: "
            f"{', '.join(choices) or '(none installed)'}. `fedmedbench plugins` lists them all"
        )

    def build(self, family: str, spec: dict[str, Any], *, key: str | None = None) -> Component:
        """Instantiate ``spec`` (``{"name": ..., **params}``) after checking the
        parameters against the constructor's keyword-only signature."""
        info = self.get(family, spec["name"], key=key)
        params = {k: v for k, v in spec.items() if k != "name"}
        check_params(info.cls, params, key=key)
        token = _BUILDING.set(self)  # a component that builds another uses this registry
        try:
            return info.cls(**params)
        except (ConfigError, KeyboardInterrupt):
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key + ': ' if key else ''}{info.name}: {exc}") from exc
        except Exception as exc:  # a bug in the plugin's constructor: name the plugin
            raise ConfigError(
                f"{key + ': ' if key else ''}{info.name} (plugin {info.plugin!r}, "
                f"distribution {info.distribution}) raised {type(exc).__name__}: {exc} in its "
                f"constructor{_origin(exc)}; fix the plugin, or leave {info.name!r} out of the "
                f"matrix") from exc
        finally:
            _BUILDING.reset(token)

    def hooks(self) -> Any:
        return self.pm.hook


def check_params(cls: type[Component], params: dict[str, Any], *, key: str | None = None) -> None:
    """Refuse unknown parameter names (with a did-you-mean), values of the wrong
    type, non-finite numbers and values outside a parameter's declared
    :class:`~fedmedbench.constraints.Range`, with a :class:`ConfigError`
    naming the key, the value and what is allowed."""
    spec = cls.param_spec()
    where = f"{key}: " if key else ""
    for k in params:
        if k not in spec:
            close = difflib.get_close_matches(k, list(spec), n=1, cutoff=0.5)
            hint = f" did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}{cls.name} has no parameter {k!r};{hint} its parameters are: "
                f"{', '.join(spec) or '(none)'}"
            )
    check_values(cls.name, rules_of(cls), params, where=where)


def plugin_manager(*, extra: list[Any] | None = None) -> pluggy.PluginManager:
    """A plugin manager with every ``fedmedbench`` entry point loaded, minus
    the names in ``FEDMEDBENCH_DISABLE_PLUGINS``; ``extra`` objects are
    registered too (tests, embedding)."""
    pm = pluggy.PluginManager("fedmedbench")
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    _import_entry_points(pm)
    try:
        pm.load_setuptools_entrypoints("fedmedbench")
    except pluggy.PluginValidationError as exc:
        raise ConfigError(_validation_message(pm, exc)) from None
    names = env_plugins()
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"FEDMEDBENCH_PLUGINS={os.environ.get('FEDMEDBENCH_PLUGINS', '')!r} "
                          f"lists {', '.join(map(repr, twice))} more than once; list each "
                          f"module once")
    for modname in names:
        if pm.is_blocked(modname):
            continue
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            raise ConfigError(f"FEDMEDBENCH_PLUGINS names {modname!r}, which cannot be "
                              f"imported: {exc}") from None
        except Exception as exc:  # the module itself raised while importing
            raise ConfigError(f"FEDMEDBENCH_PLUGINS names {modname!r}, which raised "
                              f"{type(exc).__name__} while importing{_origin(exc)}: {exc}; fix "
                              f"the module or remove it from FEDMEDBENCH_PLUGINS") from None
        other = pm.get_name(module)
        if other is not None:
            raise ConfigError(f"FEDMEDBENCH_PLUGINS names {modname!r}, which is already "
                              f"registered as plugin {other!r} (an installed entry point); "
                              f"remove it from FEDMEDBENCH_PLUGINS")
        try:
            pm.register(module, name=modname)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(_validation_message(pm, exc)) from None
        except ValueError as exc:
            raise ConfigError(f"FEDMEDBENCH_PLUGINS names {modname!r}, which cannot be "
                              f"registered: {exc}") from None
    for obj in extra or []:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        if not pm.is_blocked(name):
            pm.register(obj, name=name)
    unknown = _unknown_hooks(pm)
    if unknown:
        raise ConfigError("; ".join(unknown))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(_validation_message(pm, exc)) from None
    return pm


def _hook_names() -> list[str]:
    """The names of fedmedbench's hooks (:mod:`fedmedbench.hookspecs`)."""
    return sorted(n for n, f in vars(hookspecs).items()
                  if callable(f) and hasattr(f, "fedmedbench_spec"))


def _plugin_label(pm: pluggy.PluginManager, plugin: Any) -> str:
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    dists = {id(p): f"{d.metadata['name']} {d.version}" for p, d in pm.list_plugin_distinfo()}
    where = dists.get(id(plugin))
    return f"plugin {name!r} ({where})" if where else f"plugin {name!r}"


def _unknown_hooks(pm: pluggy.PluginManager) -> list[str]:
    """One message per hook implementation whose name is not a fedmedbench
    hook (a typo), with a did-you-mean."""
    names = _hook_names()
    out = []
    for hname, caller in sorted(vars(pm.hook).items()):
        if not isinstance(caller, pluggy.HookCaller) or caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            close = difflib.get_close_matches(hname, names, n=1, cutoff=0.6)
            hint = f" did you mean {close[0]!r}?" if close else ""
            out.append(f"{_plugin_label(pm, impl.plugin)} implements {hname!r}, which is not a "
                       f"fedmedbench hook;{hint} hooks are: {', '.join(names)}")
    return out


def _validation_message(pm: pluggy.PluginManager, exc: Exception) -> str:
    plugin = getattr(exc, "plugin", None)
    who = _plugin_label(pm, plugin) if plugin is not None else "a plugin"
    text = " ".join(str(exc).split())
    return (f"{who} does not match fedmedbench's hooks: {text}; see `fedmedbench.hookspecs` "
            f"for each hook's arguments, or block the plugin with "
            f"FEDMEDBENCH_DISABLE_PLUGINS={pm.get_name(plugin) if plugin is not None else 'NAME'}")


def _import_entry_points(pm: pluggy.PluginManager, group: str = "fedmedbench") -> None:
    """Import every installed entry point of ``group`` that is not blocked, so
    that one that fails is named with its distribution, its entry point and the
    escape hatch (pluggy would raise the bare ImportError)."""
    from importlib import metadata

    seen: set[str] = set()
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != group or ep.name in seen or pm.is_blocked(ep.name):
                continue
            seen.add(ep.name)
            try:
                ep.load()
            except Exception as exc:
                name = dist.metadata["name"] if dist.metadata else "?"
                raise ConfigError(
                    f"plugin {ep.name!r} cannot be loaded: entry point {ep.name!r} = "
                    f"{ep.value!r} of the installed distribution {name} {dist.version} raised "
                    f"{type(exc).__name__}: {exc}{_origin(exc)}; fix or reinstall {name} "
                    f"(pip install --force-reinstall {name}), uninstall it, or skip it with "
                    f"FEDMEDBENCH_DISABLE_PLUGINS={ep.name}") from None


def _origin(exc: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def env_plugins() -> list[str]:
    """Modules named in ``FEDMEDBENCH_PLUGINS`` (comma-separated import paths):
    plugins used without packaging them, like pytest's ``-p``."""
    raw = os.environ.get("FEDMEDBENCH_PLUGINS", "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def disabled_plugins() -> list[str]:
    raw = os.environ.get("FEDMEDBENCH_DISABLE_PLUGINS", "")
    return [n.strip() for n in raw.split(",") if n.strip()]


_CACHE: dict[tuple, Registry] = {}


#: the registry whose ``build`` is running (a component that wraps or builds
#: another, like ``finetune``, builds it from the same plugins)
_BUILDING: contextvars.ContextVar[Registry | None] = contextvars.ContextVar(
    "fedmedbench_building", default=None)


def current_registry() -> Registry:
    """The registry building the current component, else the installed plugins'."""
    return _BUILDING.get() or get_registry()


def build_component(family: str, spec: str | dict[str, Any], *, key: str | None = None
                    ) -> Component:
    """Build another component from its matrix spec (``"fedprox"`` or
    ``{"name": "fedprox", "mu": 0.1}``) with the registry that is building
    the caller, checked as a matrix entry is: for components that wrap or
    build others (``finetune`` wraps an algorithm).

    Parameters
    ----------
    family : str
        One of :data:`fedmedbench.FAMILIES`.
    spec : str or dict
        The component's name, or a table with ``name`` and its parameters.
    key : str, optional
        Where the spec came from, for error messages (``"finetune.algorithm"``).

    Raises
    ------
    ConfigError
        Unknown name (with a did-you-mean), or a parameter its rules refuse.
    """
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    if not isinstance(spec.get("name"), str):
        raise ConfigError(f"{key + ': ' if key else ''}a component spec needs a string `name`, "
                          f"got {spec!r}")
    return current_registry().build(family, spec, key=key)


def get_registry(*, extra: list[Any] | None = None, refresh: bool = False) -> Registry:
    """The registry of installed plugins (cached per disable list)."""
    # the extra objects themselves are part of the key (kept alive by it, so an
    # id can never be reused for another plugin set)
    key = (tuple(disabled_plugins()), tuple(env_plugins()), tuple(extra or []))
    if refresh or key not in _CACHE:
        _CACHE[key] = Registry(plugin_manager(extra=extra))
    return _CACHE[key]
