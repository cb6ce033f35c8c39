"""The errors a user causes through the config or the data; ``train.py`` prints their message alone."""
from segtrain.devices import ConfigError
from segtrain.export import ExportError
from segtrain.losses import LossParamError
from segtrain.losses.target import MaskValueError
from segtrain.registry import UnknownNameError
from segtrain.trainer import TrainingError

USER_ERRORS = (ConfigError, ExportError, LossParamError, MaskValueError, UnknownNameError, TrainingError)
