"""``hydra/sweeper=vectorized``: run a user's ordinary multirun as vectorized groups.

    python experiments/train.py -m hydra/sweeper=vectorized init=xavier_uniform,normal optim.lr=0.01,0.1,1 seed=0,1

The sweep is expanded like Hydra's basic sweeper (the cartesian product of the sweep overrides, the same
job numbers and directories). Each job's config is composed and grouped with
:func:`manualbp.fast.sweep.group_key`: jobs that differ only in seed, init, SGD learning rate / momentum /
weight decay, lr_schedule and stopping train together as one batched model
(:func:`manualbp.fast.sweep.run_many`), each written to its own job directory (``.hydra/config.yaml``,
``.hydra/overrides.yaml``, ``config.json``, ``history.csv``, ``metrics.json``) so ``report.py`` reads the
sweep unchanged. Groups smaller than ``min_group_size`` and jobs that cannot be vectorized (another
optimizer, ...) run as ordinary jobs through the configured launcher.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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


ConfigStore.instance().store(group="hydra/sweeper", name="vectorized", node=VectorizedSweeperConf, provider="manualbp")


class VectorizedSweeper(Sweeper):
    def __init__(self, min_group_size: int = 2, max_group_size: int = 256) -> None:
        super().__init__()
        self.min_group_size = int(min_group_size)
        self.max_group_size = int(max_group_size)
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None

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
        overrides = parser.parse_overrides(arguments)
        return BasicSweeper.split_arguments(overrides, None)[0]

    def _compose(self, overrides: list[str], idx: int) -> tuple[DictConfig, dict]:
        """The job's composed config (with hydra.job.num and output dir set) and run()'s plain config."""
        from manualbp.experiment import prepare_config

        loader = self.hydra_context.config_loader  # type: ignore[union-attr]
        cfg = loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
            out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            cfg.hydra.runtime.output_dir = str(out.absolute())
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        config = prepare_config(task_cfg)
        return cfg, config

    def sweep(self, arguments: list[str]) -> Any:
        from manualbp.experiment import headline, objective
        from manualbp.fast.sweep import group_key, run_many

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        jobs = self._jobs(arguments)
        composed: dict[int, tuple[DictConfig, dict]] = {}
        groups: dict[str, list[int]] = {}
        fallback: list[int] = []
        for idx, overrides in enumerate(jobs):
            try:
                cfg, config = self._compose(overrides, idx)
                key = group_key(config) if str(config["optim"].get("name", "")).lower() == "sgd" else None
            except Exception as exc:  # noqa: BLE001 - let the ordinary job report its own error
                log.info("job %d runs as an ordinary job (%s: %s)", idx, type(exc).__name__, exc)
                key = None
            if key is None:
                fallback.append(idx)
                continue
            composed[idx] = (cfg, config)
            groups.setdefault(key, []).append(idx)
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
                cfg, config = composed[idx]
                hydra_dir = Path(config["output_dir"]) / str(cfg.hydra.output_subdir or ".hydra")
                hydra_dir.mkdir(parents=True, exist_ok=True)
                OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), hydra_dir / "config.yaml")
                OmegaConf.save(OmegaConf.create(list(jobs[idx])), hydra_dir / "overrides.yaml")
            log.info("vectorized group of %d jobs: #%s", len(members), ",".join(map(str, members)))
            results = run_many([composed[idx][1] for idx in members])
            group_returns = []
            for idx, result in zip(members, results):
                config = composed[idx][1]
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
