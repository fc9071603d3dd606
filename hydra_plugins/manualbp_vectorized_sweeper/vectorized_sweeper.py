"""``hydra/sweeper=vectorized``: run a user's ordinary multirun as vectorized groups.

    python experiments/train.py -m hydra/sweeper=vectorized init=xavier_uniform,normal optim.lr=0.01,0.1,1 seed=0,1

The sweep is expanded like Hydra's basic sweeper (the cartesian product of the sweep overrides, the same
job numbers and directories). Each job's config is composed and grouped with
:func:`manualbp.fast.sweep.group_key`: jobs that differ only in seed, init, optimizer hyperparameters (lr,
momentum, weight decay, betas, eps; one optimizer per group), hidden widths (at one depth, padded to the
widest), lr_schedule and stopping train together as one batched model
(:func:`manualbp.fast.sweep.run_many`), each written to its own job directory (``.hydra/config.yaml``,
``.hydra/overrides.yaml``, ``config.json``, ``history.csv``, ``metrics.json``) so ``report.py`` reads the
sweep unchanged. Groups smaller than ``min_group_size`` and jobs that cannot be vectorized (another
optimizer, ...) run as ordinary jobs through the configured launcher.
"""

import copy
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class VectorizedSweeperConf:
    _target_: str = "hydra_plugins.manualbp_vectorized_sweeper.vectorized_sweeper.VectorizedSweeper"
    min_group_size: int = 2
    max_group_size: int = 256
    # sweep parameters given in a config (an experiment preset's hydra.sweeper.params), as the basic sweeper's
    params: Optional[dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="vectorized", node=VectorizedSweeperConf, provider="manualbp")


class _ParsedOnce:
    """A Hydra config repository that reads and parses each config file once and hands out deep copies.

    Each composition modifies what it loads (Hydra gives each one a fresh ``CachingConfigRepository``), so a
    copy stands in for a fresh parse; copying a small config is much cheaper than parsing its YAML.
    ``CachingConfigRepository`` deep-copies its delegate: a copy of this is this, so the memo is shared.
    """

    def __init__(self, repository: Any) -> None:
        self.delegate = repository
        self.memo: dict[str, Any] = {}

    def __deepcopy__(self, memo: dict) -> "_ParsedOnce":
        return self

    def load_config(self, config_path: str) -> Any:
        if config_path not in self.memo:
            self.memo[config_path] = self.delegate.load_config(config_path)
        return copy.deepcopy(self.memo[config_path])

    def initialize_sources(self, config_search_path: Any) -> None:  # pragma: no cover - not used (see below)
        raise RuntimeError("_ParsedOnce: the config search path cannot change")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.delegate, name)


class JobComposer:
    """Each job's config, as Hydra's ``ConfigLoaderImpl.load_sweep_config`` composes it, composed once per
    distinct set of config-group overrides.

    Hydra composes a job in two parts: the defaults list and the merge of its config files, which depend
    only on the config-group overrides (``init=normal``), then the value overrides (``optim.lr=0.1``)
    applied on top. A sweep of 64 jobs over 8 inits and 8 learning rates thus needs 8 compositions, not 64
    (each costs a few hundred milliseconds of YAML loading and merging). The second part is done per job
    exactly as Hydra does it. A job this cannot handle (an override of ``hydra.searchpath``, an error of
    any kind) is composed by Hydra itself, which then raises its own error. ``tests/fast/test_vectorized_sweep``
    checks the result equals ``load_sweep_config``'s.
    """

    def __init__(self, loader: Any, master: DictConfig) -> None:
        self.loader = loader
        self.master = master
        self.config_name = master.hydra.job.config_name
        self.hydra_overrides: list[str] = list(OmegaConf.to_container(master.hydra.overrides.hydra))  # type: ignore[arg-type]
        self._bases: dict[tuple, tuple[bytes, dict, list]] = {}
        self._repo: Any = None
        # config files parsed once per sweep; not when hydra.searchpath re-initializes each composition's sources
        self._files = None if master.hydra.get("searchpath") else _ParsedOnce(loader.repository)
        self._parser = OverridesParser.create()
        self._parsed: dict[str, Any] = {}
        self.composed = 0  # full compositions done (cache misses and fallbacks)

    def __call__(self, overrides: Sequence[str]) -> DictConfig:
        try:
            return self._compose(list(overrides))
        except Exception as exc:  # noqa: BLE001 - Hydra's own compose reports the error
            log.debug("fast compose of %s failed (%s); composing with Hydra", overrides, exc)
        self.composed += 1
        return self.loader.load_sweep_config(self.master, list(overrides))

    def _parse(self, lines: list[str]) -> list[Any]:
        """Hydra's parse of the override lines, each distinct line parsed once (the grammar is slow)."""
        missing = [line for line in dict.fromkeys(lines) if line not in self._parsed]
        if missing:
            self._parsed.update(zip(missing, self._parser.parse_overrides(overrides=missing)))
        return [copy.copy(self._parsed[line]) for line in lines]

    def _caching_repo(self, parsed: list[Any]) -> Any:
        """ConfigLoaderImpl._parse_overrides_and_create_caching_repo, on the parsed-once files."""
        from hydra._internal.config_repository import CachingConfigRepository

        if self._files is None:
            return self.loader._parse_overrides_and_create_caching_repo(
                self.config_name, [o.input_line for o in parsed]
            )[1]
        repo = CachingConfigRepository(self._files)
        self.loader._process_config_searchpath(self.config_name, parsed, repo)
        return repo

    def _compose(self, overrides: list[str]) -> DictConfig:
        from hydra import __version__, version
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from hydra._internal.defaults_list import Overrides, create_defaults_list
        from hydra.conf import ConfigSourceInfo
        from hydra.core.utils import JobRuntime

        lines = self.hydra_overrides + overrides
        parsed = self._parse(lines)
        if any(o.get_key_element() == "hydra.searchpath" for o in parsed[len(self.hydra_overrides) :]):
            raise ValueError("hydra.searchpath differs per job")
        self.loader.validate_sweep_overrides_legal(overrides=parsed, run_mode=RunMode.RUN, from_shell=True)
        if self._repo is None:
            self._repo = self._caching_repo(parsed)
        config_overrides = Overrides(repo=self._repo, overrides_list=parsed).config_overrides
        key = tuple(o.input_line for o in parsed if not any(o is c for c in config_overrides))
        if key not in self._bases:
            repo = self._caching_repo(parsed)
            defaults_list = create_defaults_list(
                repo=repo, config_name=self.config_name, overrides_list=parsed, prepend_hydra=True, skip_missing=False
            )
            base = self.loader._compose_config_from_defaults_list(defaults=defaults_list.defaults, repo=repo)
            OmegaConf.set_struct(base, True)
            OmegaConf.set_readonly(base.hydra, False)
            sources = [
                ConfigSourceInfo(path=x.path, schema=x.scheme(), provider=x.provider) for x in repo.get_sources()
            ]
            # kept pickled: unpickling a fresh copy per job is about 3x faster than deep-copying the config
            self._bases[key] = (pickle.dumps(base), dict(defaults_list.overrides.known_choices), sources)
            self.composed += 1
        blob, choices, sources = self._bases[key]
        cfg = pickle.loads(blob)  # this job's own copy of the composed config
        # the rest of ConfigLoaderImpl._load_configuration_impl and load_sweep_config, per job
        ConfigLoaderImpl._apply_overrides_to_config(config_overrides, cfg)
        app_overrides = []
        for override in parsed:
            if override.is_hydra_override():
                cfg.hydra.overrides.hydra.append(override.input_line)
            else:
                cfg.hydra.overrides.task.append(override.input_line)
                app_overrides.append(override)
        with open_dict(cfg.hydra):
            cfg.hydra.runtime.choices.update(choices)
            for k in cfg.hydra.job.env_copy:
                cfg.hydra.job.env_set[k] = os.environ[k]
        cfg.hydra.runtime.version = __version__
        cfg.hydra.runtime.version_base = version.getbase()
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.config_sources = sources
        if "name" not in cfg.hydra.job:
            cfg.hydra.job.name = JobRuntime().get("name")
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app_overrides,
            kv_sep=cfg.hydra.job.config.override_dirname.kv_sep,
            item_sep=cfg.hydra.job.config.override_dirname.item_sep,
            exclude_keys=cfg.hydra.job.config.override_dirname.exclude_keys,
        )
        cfg.hydra.job.config_name = self.config_name
        OmegaConf.copy_cache(from_config=self.master, to_config=cfg)
        return cfg


class VectorizedSweeper(Sweeper):
    def __init__(
        self, min_group_size: int = 2, max_group_size: int = 256, params: Optional[dict[str, str]] = None
    ) -> None:
        super().__init__()
        self.min_group_size = int(min_group_size)
        self.max_group_size = int(max_group_size)
        self.params = dict(params or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None
        self._composer: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- expansion (as the basic sweeper) --------------------------------------------------------------
    def _jobs(self, arguments: list[str]) -> list[list[str]]:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)  # type: ignore[union-attr]
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        return BasicSweeper.split_arguments(overrides, None)[0]

    def _compose(self, overrides: list[str], idx: int) -> tuple[DictConfig, DictConfig, dict]:
        """The job's composed config (with hydra.job.num and output dir set), its task part (what the
        ordinary launcher saves as .hydra/config.yaml) and run()'s plain config."""
        from manualbp.experiment import prepare_config

        cfg = self._composer(overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
            out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            cfg.hydra.runtime.output_dir = str(out.absolute())
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        config = prepare_config(task_cfg)
        return cfg, task_cfg, config

    def sweep(self, arguments: list[str]) -> Any:
        from manualbp.experiment import headline, objective
        from manualbp.fast.sweep import group_key, run_many, unsupported

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        jobs = self._jobs(arguments)
        self._composer = JobComposer(self.hydra_context.config_loader, self.config)  # type: ignore[union-attr]
        tic = time.perf_counter()
        composed: dict[int, tuple[DictConfig, DictConfig, dict]] = {}
        groups: dict[str, list[int]] = {}
        fallback: list[int] = []
        for idx, overrides in enumerate(jobs):
            try:
                cfg, task_cfg, config = self._compose(overrides, idx)
                reason = unsupported(config)
                if reason:
                    log.info("job %d runs as an ordinary job (%s)", idx, reason)
                key = group_key(config) if reason is None else None
            except Exception as exc:  # noqa: BLE001 - let the ordinary job report its own error
                log.info("job %d runs as an ordinary job (%s: %s)", idx, type(exc).__name__, exc)
                key = None
            if key is None:
                fallback.append(idx)
                continue
            composed[idx] = (cfg, task_cfg, config)
            groups.setdefault(key, []).append(idx)
        log.info(
            "composed %d job configs in %.1f s (%d full compositions)",
            len(jobs),
            time.perf_counter() - tic,
            self._composer.composed,
        )
        batches: list[list[int]] = []
        for members in groups.values():
            if len(members) < self.min_group_size:
                fallback += members
                continue
            for i in range(0, len(members), self.max_group_size):
                batches.append(members[i : i + self.max_group_size])
        returns: list[Any] = []
        for members in batches:
            tic = time.perf_counter()
            for idx in members:
                cfg, task_cfg, config = composed[idx]
                hydra_dir = Path(config["output_dir"]) / str(cfg.hydra.output_subdir or ".hydra")
                hydra_dir.mkdir(parents=True, exist_ok=True)
                OmegaConf.save(task_cfg, hydra_dir / "config.yaml")
                OmegaConf.save(OmegaConf.create(list(jobs[idx])), hydra_dir / "overrides.yaml")
            log.info("vectorized group of %d jobs: #%s", len(members), ",".join(map(str, members)))
            try:
                results = run_many([composed[idx][2] for idx in members])
            except Exception as exc:  # noqa: BLE001 - each job then runs (and fails, or not) on its own
                log.error(
                    "vectorized group #%s failed (%s: %s); its jobs run as ordinary jobs",
                    ",".join(map(str, members)),
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                fallback += members
                continue
            group_returns = []
            for idx, result in zip(members, results):
                config = composed[idx][2]
                print(headline(result, config.get("output_dir")), flush=True)
                ret = JobReturn()
                ret.overrides = list(jobs[idx])
                ret.cfg = composed[idx][0]
                ret.working_dir = os.getcwd()
                ret.task_name = "vectorized"
                ret.status = JobStatus.COMPLETED
                ret._return_value = objective(result, config)
                group_returns.append(ret)
            log.info("group done in %.1f s", time.perf_counter() - tic)
            returns.append(group_returns)
        for idx in sorted(fallback):
            results = self.launcher.launch([jobs[idx]], initial_job_idx=idx)
            for r in results:
                _ = r.return_value
            returns.append(results)
        return returns
