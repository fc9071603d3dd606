"""Train one configuration, or sweep many with -m. A thin Hydra wrapper around manualbp.train.run.

    python experiments/train.py                                  # the default run (digits, W&B offline)
    python experiments/train.py -m init=zeros,xavier_uniform optim.lr=0.01,0.1,1.0
    python experiments/train.py experiment=init_study -m         # a preset study

Returns the monitored metric so Hydra sweepers (optuna) can optimize it.
"""

import hydra

from manualbp.experiment import train_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg) -> float:
    return train_job(cfg)


if __name__ == "__main__":
    main()
