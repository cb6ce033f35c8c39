"""Train a segmentation model: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # UNet on the generated shapes dataset
    python train.py loss=focal device_list=[0]        # focal loss on CUDA device 0
    python train.py -m loss=ce,focal optimizer.lr=0.01,0.001   # a sweep of four runs
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import segtrain.run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best val mIoU, so Hydra sweepers can optimise it."""
    return segtrain.run.train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
