"""moekit.train: corpus and tokenizer, packed batches, the Trainer, atomic checkpoints, compare.

`Trainer(model, config=TrainConfig(...), train=..., val=..., out_dir=...).fit(resume=...)`; the
`moekit train`, `moekit compare` and `moekit data` commands are built from these pieces.
"""

from moekit.train.runfolder import RunFolderBusy, RunLock, StorageError
from moekit.train.trainer import FitResult, NonFiniteLossError, TrainConfig, Trainer

__all__ = ["FitResult", "NonFiniteLossError", "RunFolderBusy", "RunLock", "StorageError", "TrainConfig",
           "Trainer"]
