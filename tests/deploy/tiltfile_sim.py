"""Evaluate the Tiltfile with recording stand-ins for Tilt's built-ins (no Tilt, Docker or cluster).

The Tiltfile runs in a real Starlark interpreter (starlark-pyo3), so syntax, names, arguments
and control flow are exercised exactly as written. Each Tilt built-in it calls is replaced by
a function that records its arguments; `helm()` runs the real helm binary (`helm template`, as
Tilt does, minus the chart's `templates/tests/` objects that Tilt filters out), so the Tiltfile
sees the objects the chart really renders. `load('ext://...')` provides stand-ins for the two
extensions it uses (helm_resource, restart_process), recording their calls.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import starlark as sl
import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sync:
    src: str
    dest: str


@dataclass(frozen=True)
class Run:
    cmd: str
    trigger: tuple[str, ...] = ()


@dataclass(frozen=True)
class FallBackOn:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class PortForward:
    local_port: int
    container_port: int | None
    name: str = ""


@dataclass(frozen=True)
class Link:
    url: str
    name: str = ""


@dataclass
class Build:
    """One image Tilt builds: a docker_build, or a docker_build_with_restart (`restart` set)."""

    ref: str
    context: str
    kwargs: dict[str, Any]
    restart: dict[str, Any] | None = None

    @property
    def live_update(self) -> list[Any]:
        return list(self.kwargs.get("live_update") or [])


@dataclass
class TiltRun:
    env: dict[str, str]
    builds: list[Build] = field(default_factory=list)
    local_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    helm_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    k8s_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    helm_calls: list[dict[str, Any]] = field(default_factory=list)
    k8s_yaml: list[str] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def objects(self) -> list[dict[str, Any]]:
        """Every object handed to k8s_yaml."""
        return [doc for text in self.k8s_yaml for doc in yaml.safe_load_all(text) if doc]

    def build(self, ref: str) -> Build:
        matches = [b for b in self.builds if b.ref == ref]
        assert len(matches) == 1, f"want one build of {ref}, got {[b.ref for b in self.builds]}"
        return matches[0]


def _strip_helm_tests(rendered: str) -> str:
    """Tilt's filterHelmTestYAML: drop documents whose `# Source:` is under templates/tests/."""
    docs = rendered.split("---\n")
    return "---\n".join(d for d in docs if not re.search(r"^# Source: .*/tests/", d, re.MULTILINE))


def evaluate(
    helm_binary: Path,
    *,
    env: dict[str, str] | None = None,
    missing_files: frozenset[str] = frozenset(),
    overlay: dict[str, str] | None = None,
    tiltfile: Path = ROOT / "Tiltfile",
) -> TiltRun:
    """Run the Tiltfile. `env` is what os.getenv sees; `missing_files` pretend not to exist;
    `overlay` maps repo paths to contents that read_file returns instead of (or beside) the tree."""
    run = TiltRun(env=dict(env or {}))
    overlay = dict(overlay or {})

    def path(p: str) -> Path:
        return ROOT / p

    def exists(p: str) -> bool:
        return p in overlay or (p not in missing_files and path(p).exists())

    def read_file(p: str, default: str | None = None) -> str:
        run.files_read.append(p)
        if p in overlay:
            return overlay[p]
        if not exists(p):
            if default is not None:
                return default
            raise FileNotFoundError(p)
        return path(p).read_text()

    def getenv(key: str, default: str | None = None) -> str | None:
        return run.env.get(key, default)

    def as_list(value: Any) -> list[Any]:
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    def docker_build(ref: str, context: str, **kwargs: Any) -> None:
        run.builds.append(Build(ref, context, kwargs))

    def docker_build_with_restart(
        ref: str,
        context: str,
        entrypoint: Any,
        live_update: list[Any],
        base_suffix: str = "-base",
        restart_file: str = "/.restart-proc",
        **kwargs: Any,
    ) -> None:
        # The extension builds `ref + base_suffix` with **kwargs, then `ref` FROM it with the
        # wrapper, the entrypoint and live_update + [run('date > restart_file')].
        run.builds.append(
            Build(
                ref,
                context,
                {**kwargs, "live_update": live_update},
                restart={"entrypoint": entrypoint, "restart_file": restart_file, "base_suffix": base_suffix},
            )
        )

    def helm(
        paths: str,
        name: str | None = None,
        namespace: str | None = None,
        values: Any = None,
        set: Any = None,
        kube_version: str | None = None,
        skip_crds: bool = False,
    ) -> str:
        argv = [str(helm_binary), "template", name or "chart", str(path(paths))]
        if namespace:
            argv += ["--namespace", namespace]
        for v in as_list(values):
            argv += ["--values", str(path(v))]
        for s in as_list(set):
            argv += ["--set", s]
        if kube_version:
            argv += ["--kube-version", kube_version]
        if not skip_crds:
            argv.append("--include-crds")
        run.helm_calls.append(
            {
                "paths": paths,
                "name": name,
                "namespace": namespace,
                "values": as_list(values),
                "set": as_list(set),
                "argv": argv,
            }
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"helm template failed ({' '.join(argv)}):\n{result.stderr}")
        return _strip_helm_tests(result.stdout)

    def decode_yaml_stream(text: str) -> list[Any]:
        return [doc for doc in yaml.safe_load_all(str(text)) if doc is not None]

    def k8s_yaml(text: Any, allow_duplicates: bool = False) -> None:
        run.k8s_yaml.append(str(text))

    def k8s_resource(workload: str = "", new_name: str = "", **kwargs: Any) -> None:
        name = new_name or workload
        assert name, "k8s_resource needs a workload or a new_name"
        entry = run.k8s_resources.setdefault(name, {"workload": workload, "new_name": new_name})
        for key, value in kwargs.items():
            if key == "resource_deps":
                entry.setdefault(key, [])
                entry[key] = list(dict.fromkeys([*entry[key], *value]))
            else:
                entry[key] = value

    def local_resource(name: str, cmd: Any = "", **kwargs: Any) -> None:
        assert name not in run.local_resources, f"local_resource {name} declared twice"
        run.local_resources[name] = {"cmd": cmd, **kwargs}

    def helm_resource(name: str, chart: str, **kwargs: Any) -> None:
        assert name not in run.helm_resources, f"helm_resource {name} declared twice"
        run.helm_resources[name] = {"chart": chart, **kwargs}

    def sync(src: str, dest: str) -> sl.OpaquePythonObject:
        return sl.OpaquePythonObject(Sync(src, dest))

    def run_step(cmd: str, trigger: Any = None, echo_off: bool = False) -> sl.OpaquePythonObject:
        return sl.OpaquePythonObject(Run(cmd, tuple(as_list(trigger))))

    def fall_back_on(files: Any) -> sl.OpaquePythonObject:
        return sl.OpaquePythonObject(FallBackOn(tuple(as_list(files))))

    def port_forward(
        local_port: int, container_port: int | None = None, name: str = "", link_path: str = "", host: str = ""
    ) -> sl.OpaquePythonObject:
        return sl.OpaquePythonObject(PortForward(local_port, container_port, name))

    def link(url: str, name: str = "") -> sl.OpaquePythonObject:
        return sl.OpaquePythonObject(Link(url, name))

    def record_settings(kind: str):
        def f(*args: Any, **kwargs: Any) -> None:
            run.settings[kind] = {"args": args, "kwargs": kwargs}

        return f

    extensions = {
        "ext://helm_resource": {"helm_resource": helm_resource},
        "ext://restart_process": {"docker_build_with_restart": docker_build_with_restart},
    }

    def loader(module: str) -> sl.FrozenModule:
        run.loads.append(module)
        if module not in extensions:
            raise ValueError(f"the Tiltfile loads {module}, which this harness does not provide")
        m = sl.Module()
        for name, fn in extensions[module].items():
            m.add_callable(name, fn)
        return m.freeze()

    mod = sl.Module()
    builtins = {
        "read_file": read_file,
        "docker_build": docker_build,
        "helm": helm,
        "k8s_yaml": k8s_yaml,
        "k8s_resource": k8s_resource,
        "local_resource": local_resource,
        "decode_yaml_stream": decode_yaml_stream,
        "decode_json": lambda text: json.loads(str(text)),
        "encode_yaml": lambda obj: yaml.safe_dump(obj, sort_keys=False),
        "encode_yaml_stream": lambda objs: yaml.safe_dump_all(list(objs), sort_keys=False),
        "sync": sync,
        "run": run_step,
        "fall_back_on": fall_back_on,
        "port_forward": port_forward,
        "link": link,
        "warn": run.warnings.append,
        "version_settings": record_settings("version_settings"),
        "update_settings": record_settings("update_settings"),
        "allow_k8s_contexts": record_settings("allow_k8s_contexts"),
        "watch_file": lambda p: run.files_read.append(p),
        "_os_getenv": getenv,
        "_os_path_exists": exists,
        "_os_path_join": lambda *parts: str(Path(*parts)),
        "_os_path_basename": lambda p: Path(p).name,
        "_os_path_dirname": lambda p: str(Path(p).parent),
    }
    for name, fn in builtins.items():
        mod.add_callable(name, fn)
    mod["TRIGGER_MODE_AUTO"] = "TRIGGER_MODE_AUTO"
    mod["TRIGGER_MODE_MANUAL"] = "TRIGGER_MODE_MANUAL"

    dialect = sl.Dialect.extended()
    globals_ = sl.Globals.extended_by(
        [sl.LibraryExtension.StructType, sl.LibraryExtension.Print, sl.LibraryExtension.Json]
    )
    prelude = (
        "os = struct(getenv=_os_getenv, path=struct(exists=_os_path_exists, join=_os_path_join, "
        "basename=_os_path_basename, dirname=_os_path_dirname))\n"
    )
    sl.eval(mod, sl.parse("<tilt-builtins>", prelude, dialect), globals_)
    sl.eval(mod, sl.parse(str(tiltfile), tiltfile.read_text(), dialect), globals_, sl.FileLoader(loader))
    return run
